//! The suites `nvmux bench --<suite>` runs instead of the default run; each writes its
//! JSON report under `--out`.

pub mod crypt;
pub mod fair;
pub mod hostile;
pub mod mirror;
pub mod nbd_tls;
pub mod nvmf;
pub mod pool;
pub mod rbd;
pub mod restart;
pub mod router;
