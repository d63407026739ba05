//! Ceph RBD backend (skeleton; implementation follows).

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, Error, ErrorKind, Result};

fn unsupported() -> Error {
    Error::new(ErrorKind::Unsupported, "rbd backend: not implemented yet")
}

/// How to reach the cluster.
#[derive(Clone, Debug)]
pub struct RbdConfig {
    pub conf: Option<PathBuf>,
    pub client_id: String,
    pub keyring: Option<PathBuf>,
    pub mon_host: Option<String>,
    pub op_timeout: Duration,
}

impl Default for RbdConfig {
    fn default() -> Self {
        RbdConfig {
            conf: None,
            client_id: "admin".into(),
            keyring: None,
            mon_host: None,
            op_timeout: Duration::from_secs(60),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    pub pool: String,
    pub namespace: String,
    pub image: String,
}

impl ImageRef {
    /// Parse `pool[/namespace]/image[@snap]`.
    pub fn parse(s: &str) -> Result<(ImageRef, Option<String>)> {
        let bad = |why: &str| {
            Error::new(
                ErrorKind::InvalidArgument,
                format!("rbd image {s:?}: {why} (expected POOL[/NAMESPACE]/IMAGE[@SNAP])"),
            )
        };
        let (path, snap) = match s.split_once('@') {
            Some((p, sn)) => {
                if sn.is_empty() || sn.contains(['@', '/']) {
                    return Err(bad("bad snapshot name"));
                }
                (p, Some(sn.to_string()))
            }
            None => (s, None),
        };
        let parts: Vec<&str> = path.split('/').collect();
        let (pool, namespace, image) = match parts.as_slice() {
            [p, i] => (*p, "", *i),
            [p, n, i] => (*p, *n, *i),
            _ => return Err(bad("wrong number of components")),
        };
        if pool.is_empty() || image.is_empty() || (parts.len() == 3 && namespace.is_empty()) {
            return Err(bad("empty component"));
        }
        if s.contains('\0') {
            return Err(bad("NUL byte"));
        }
        Ok((
            ImageRef {
                pool: pool.into(),
                namespace: namespace.into(),
                image: image.into(),
            },
            snap,
        ))
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{}/{}", self.pool, self.image)
        } else {
            write!(f, "{}/{}/{}", self.pool, self.namespace, self.image)
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImageInfo {
    pub size: u64,
    pub object_size: u64,
    pub features: u64,
    pub parent: Option<String>,
    pub snapshots: Vec<String>,
}

pub struct RbdCluster {
    _p: (),
}

impl RbdCluster {
    pub fn connect(_cfg: &RbdConfig) -> Result<Arc<RbdCluster>> {
        Err(unsupported())
    }
    pub fn image_info(&self, _img: &ImageRef) -> Result<Option<ImageInfo>> {
        Err(unsupported())
    }
    pub fn create_image(&self, _img: &ImageRef, _size: u64) -> Result<()> {
        Err(unsupported())
    }
    pub fn resize_image(&self, _img: &ImageRef, _size: u64) -> Result<()> {
        Err(unsupported())
    }
    pub fn create_snapshot(&self, _img: &ImageRef, _snap: &str) -> Result<()> {
        Err(unsupported())
    }
    pub fn remove_snapshot(&self, _img: &ImageRef, _snap: &str) -> Result<()> {
        Err(unsupported())
    }
    pub fn clone_image(&self, _parent: &ImageRef, _snap: &str, _child: &ImageRef) -> Result<()> {
        Err(unsupported())
    }
    pub fn remove_image(&self, _img: &ImageRef) -> Result<()> {
        Err(unsupported())
    }
}

#[derive(Clone, Debug)]
pub struct RbdOptions {
    pub read_only: bool,
    pub snapshot: Option<String>,
    pub block_size: u32,
}

impl Default for RbdOptions {
    fn default() -> Self {
        RbdOptions {
            read_only: false,
            snapshot: None,
            block_size: 512,
        }
    }
}

pub struct RbdDevice {
    info: DeviceInfo,
}

impl RbdDevice {
    pub fn open(
        _cluster: &Arc<RbdCluster>,
        _img: &ImageRef,
        _opts: &RbdOptions,
    ) -> Result<RbdDevice> {
        Err(unsupported())
    }
    pub fn resize(&self, _size: u64) -> Result<()> {
        Err(unsupported())
    }
}

impl BlockDevice for RbdDevice {
    fn info(&self) -> &DeviceInfo {
        &self.info
    }
    fn open_queue(&self, _depth: u32) -> Result<Box<dyn BlockQueue>> {
        Err(unsupported())
    }
    fn describe(&self) -> String {
        "rbd".into()
    }
}
