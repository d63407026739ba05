//! The HTTP/JSON API on a Unix socket. Routes are listed in docs/api.md.
//!
//! Errors are `{"error": "<what failed, on which object, what to do>", "kind": "<kind>"}`
//! with a matching HTTP status (400 bad input, 404 not found, 409 conflict, 500 I/O).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use nvmux_core::{Error, ErrorKind, Result};
use serde::Serialize;
use tiny_http::{Header, Method, Request, Response, Server};

use crate::pools::{PoolCreate, Resize, SnapshotCreate};
use crate::{Daemon, DiskCreate, ExportCreate};

/// Largest request body accepted (bytes).
const MAX_BODY: u64 = 1 << 20;

pub struct ApiServer {
    server: Arc<Server>,
    threads: Vec<JoinHandle<()>>,
    path: PathBuf,
}

impl ApiServer {
    pub fn start(daemon: Arc<Daemon>, path: &Path) -> Result<ApiServer> {
        crate::claim_socket(path)?;
        let server = Server::http_unix(path).map_err(|e| {
            Error::new(ErrorKind::Io, format!("API socket {}: {e}", path.display()))
        })?;
        let server = Arc::new(server);
        let mut threads = Vec::new();
        for i in 0..2 {
            let (s, d) = (server.clone(), daemon.clone());
            let t = std::thread::Builder::new()
                .name(format!("nvmux-api{i}"))
                .spawn(move || {
                    while let Ok(req) = s.recv() {
                        handle(&d, req);
                    }
                })
                .map_err(|e| Error::io("spawn API thread", e))?;
            threads.push(t);
        }
        Ok(ApiServer {
            server,
            threads,
            path: path.to_path_buf(),
        })
    }

    pub fn stop(self) {
        for _ in &self.threads {
            self.server.unblock();
        }
        for t in self.threads {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

fn json_header() -> Header {
    Header::from_bytes(&b"Content-Type"[..], &b"application/json"[..]).expect("static header")
}

fn reply_json<T: Serialize>(req: Request, code: u16, v: &T) {
    let body = serde_json::to_string_pretty(v).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"));
    let _ = req.respond(
        Response::from_string(body + "\n")
            .with_status_code(code)
            .with_header(json_header()),
    );
}

fn kind_name(k: ErrorKind) -> &'static str {
    match k {
        ErrorKind::InvalidArgument => "invalid_argument",
        ErrorKind::NotFound => "not_found",
        ErrorKind::AlreadyExists => "already_exists",
        ErrorKind::Unsupported => "unsupported",
        ErrorKind::Busy => "busy",
        _ => "io",
    }
}

fn reply_err(req: Request, e: &Error) {
    let code = match e.kind {
        ErrorKind::InvalidArgument | ErrorKind::Unsupported => 400,
        ErrorKind::NotFound => 404,
        ErrorKind::AlreadyExists | ErrorKind::Busy => 409,
        _ => 500,
    };
    reply_json(
        req,
        code,
        &serde_json::json!({ "error": e.msg, "kind": kind_name(e.kind) }),
    );
}

fn body<T: serde::de::DeserializeOwned>(req: &mut Request) -> Result<T> {
    let mut buf = Vec::new();
    req.as_reader()
        .take(MAX_BODY + 1)
        .read_to_end(&mut buf)
        .map_err(|e| Error::io("read request body", e))?;
    if buf.len() as u64 > MAX_BODY {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            "request body is too large",
        ));
    }
    serde_json::from_slice(&buf)
        .map_err(|e| Error::new(ErrorKind::InvalidArgument, format!("bad request body: {e}")))
}

/// `POST /v1/pools/check` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CheckReq {
    path: PathBuf,
}

fn handle(d: &Daemon, mut req: Request) {
    let query = req
        .url()
        .split_once('?')
        .map(|(_, q)| q.to_string())
        .unwrap_or_default();
    let flag = |name: &str| {
        query
            .split('&')
            .any(|kv| kv == name || kv == format!("{name}=1") || kv == format!("{name}=true"))
    };
    let url = req.url().split('?').next().unwrap_or("").to_string();
    let parts: Vec<&str> = url.trim_matches('/').split('/').collect();
    let method = req.method().clone();
    match (&method, parts.as_slice()) {
        (Method::Get, ["v1", "health"]) => reply_json(
            req,
            200,
            &serde_json::json!({"status": "ok", "version": env!("CARGO_PKG_VERSION")}),
        ),
        (Method::Get, ["v1", "disks"]) => reply_json(req, 200, &d.disks()),
        (Method::Post, ["v1", "disks"]) => {
            match body::<DiskCreate>(&mut req).and_then(|b| d.create_disk(b)) {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "disks", name]) => match d.disk(name) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Delete, ["v1", "disks", name]) => {
            let erase = flag("erase");
            let t = std::time::Instant::now();
            match d.delete_disk(name, erase) {
                Ok(bytes) => reply_json(
                    req,
                    200,
                    &serde_json::json!({"deleted": name, "erased_bytes": if erase { Some(bytes) } else { None }, "seconds": t.elapsed().as_secs_f64()}),
                ),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "disks", name, "snapshot"]) => {
            match body::<SnapshotCreate>(&mut req).and_then(|b| d.snapshot_disk(name, &b.snapshot))
            {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "disks", name, "qos"]) => {
            match body::<crate::QosSpec>(&mut req).and_then(|q| d.set_qos(name, q)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "disks", name, "chain"]) => {
            match body::<ChainBody>(&mut req).and_then(|b| d.set_chain(name, b.chain)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "disks", name, "crypto-erase"]) => match d.crypto_erase(name) {
            Ok(secs) => reply_json(
                req,
                200,
                &serde_json::json!({"disk": name, "seconds": secs}),
            ),
            Err(e) => reply_err(req, &e),
        },
        (Method::Post, ["v1", "disks", name, "resize"]) => {
            match body::<Resize>(&mut req).and_then(|b| d.resize_disk(name, b)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "disks", name, "classifier"]) => match d.classifier(name) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Post, ["v1", "disks", name, "classifier"]) => {
            match body::<crate::routing::ClassifierLoad>(&mut req)
                .and_then(|b| d.set_classifier(name, b))
            {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Delete, ["v1", "disks", name, "classifier"]) => match d.clear_classifier(name) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Post, ["v1", "disks", name, "classifier", "maps", map]) => {
            match body::<crate::routing::MapWrite>(&mut req).and_then(|b| d.set_map(name, map, b)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "disks", name, "external"]) => {
            match body::<crate::routing::ExternalSet>(&mut req)
                .and_then(|b| d.set_external(name, Some(b)))
            {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Delete, ["v1", "disks", name, "external"]) => match d.set_external(name, None) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Get, ["v1", "pools"]) => reply_json(req, 200, &d.pools()),
        (Method::Post, ["v1", "keys", "rotate"]) => {
            #[derive(serde::Deserialize)]
            #[serde(deny_unknown_fields)]
            struct Rotate {
                kek_file: std::path::PathBuf,
            }
            match body::<Rotate>(&mut req).and_then(|r| d.rotate_kek(&r.kek_file)) {
                Ok(n) => reply_json(req, 200, &serde_json::json!({"rewrapped": n})),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "operations"]) => reply_json(req, 200, &d.operations()),
        (Method::Post, ["v1", "pools"]) => {
            match body::<PoolCreate>(&mut req).and_then(|b| d.create_pool(b)) {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "pools", "check"]) => {
            match body::<CheckReq>(&mut req).and_then(|b| crate::pools::check_path(&b.path)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "pools", name]) => match d.pool(name) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Delete, ["v1", "pools", name]) => match d.remove_pool(name) {
            Ok(()) => reply_json(req, 200, &serde_json::json!({"removed": name})),
            Err(e) => reply_err(req, &e),
        },
        (Method::Delete, ["v1", "pools", pool, "volumes", vol]) => {
            match d.delete_volume(pool, vol) {
                Ok(()) => reply_json(req, 200, &serde_json::json!({"deleted": vol})),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "exports"]) => reply_json(req, 200, &d.exports()),
        (Method::Post, ["v1", "exports"]) => {
            match body::<ExportCreate>(&mut req).and_then(|b| d.create_export(b)) {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Delete, ["v1", "exports", name]) => match d.delete_export(name) {
            Ok(()) => reply_json(req, 200, &serde_json::json!({"deleted": name})),
            Err(e) => reply_err(req, &e),
        },
        (Method::Get, ["v1", "subsystems"]) => reply_json(req, 200, &d.subsystems()),
        (Method::Post, ["v1", "subsystems"]) => {
            match body::<crate::nvmf::SubsystemCreate>(&mut req).and_then(|b| d.create_subsystem(b))
            {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "subsystems", nqn]) => match d.subsystem(nqn) {
            Ok(v) => reply_json(req, 200, &v),
            Err(e) => reply_err(req, &e),
        },
        (Method::Delete, ["v1", "subsystems", nqn]) => match d.delete_subsystem(nqn) {
            Ok(()) => reply_json(req, 200, &serde_json::json!({"deleted": nqn})),
            Err(e) => reply_err(req, &e),
        },
        (Method::Post, ["v1", "subsystems", nqn, "namespaces"]) => {
            match body::<crate::nvmf::NamespaceCreate>(&mut req)
                .and_then(|b| d.add_namespace(nqn, b))
            {
                Ok(v) => reply_json(req, 201, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Delete, ["v1", "subsystems", nqn, "namespaces", nsid]) => {
            let r = nsid
                .parse::<u32>()
                .map_err(|_| {
                    Error::new(
                        ErrorKind::InvalidArgument,
                        format!("namespace id {nsid:?} is not a number"),
                    )
                })
                .and_then(|n| d.remove_namespace(nqn, n));
            match r {
                Ok(()) => reply_json(req, 200, &serde_json::json!({"removed": nsid})),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "subsystems", nqn, "hosts"]) => {
            match body::<crate::nvmf::HostAllow>(&mut req).and_then(|b| d.allow_host(nqn, b)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Delete, ["v1", "subsystems", nqn, "hosts", host]) => {
            match d.deny_host(nqn, host) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "subsystems", nqn, "auth"]) => {
            match body::<crate::nvmf::SubsystemAuth>(&mut req)
                .and_then(|b| d.set_subsystem_auth(nqn, b))
            {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Post, ["v1", "subsystems", nqn, "listen"]) => {
            match body::<ListenBody>(&mut req).and_then(|b| d.set_listen(nqn, &b.listen)) {
                Ok(v) => reply_json(req, 200, &v),
                Err(e) => reply_err(req, &e),
            }
        }
        (Method::Get, ["v1", "stats"]) => reply_json(req, 200, &d.stats()),
        (Method::Get, ["metrics"]) => {
            let text = crate::metrics::render(d);
            let h = Header::from_bytes(&b"Content-Type"[..], &b"text/plain; version=0.0.4"[..])
                .expect("static header");
            let _ = req.respond(Response::from_string(text).with_header(h));
        }
        _ => reply_err(
            req,
            &Error::new(
                ErrorKind::NotFound,
                format!("no route {method} {url}; see docs/api.md"),
            ),
        ),
    }
}

/// `POST /v1/subsystems/{nqn}/listen` body.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListenBody {
    listen: String,
}

/// `POST /v1/disks/{name}/chain` body; `null` or absent: the default chain.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ChainBody {
    #[serde(default)]
    chain: Option<Vec<crate::Function>>,
}
