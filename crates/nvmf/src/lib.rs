//! NVMe over TCP target for nvmux.
//!
//! * [`ctrl`]: the NVMe controller model, free of transport code: subsystems and their
//!   namespaces (nvmux disks) and host allow-lists, controllers, admin commands (Identify,
//!   Get Log Page, Get/Set Features, Keep Alive, Asynchronous Events), Fabrics Connect and
//!   Property Get/Set.
//! * [`model`]: Identify data, log pages and feature values every nvmux controller
//!   shares (NVMe/TCP and the vfio-user PCIe controller).
//! * [`nvm`]: the NVM command set's I/O semantics on the frontend engine
//!   ([`nvmux_core::engine`]): decoding, Write Zeroes emulation, the Dataset Management
//!   fan-out. Transport-independent: the vfio-user PCIe controller reuses it with
//!   [`ctrl`].
//! * [`pdu`]: NVMe/TCP PDU parsing and encoding on byte slices (fuzzed).
//! * [`conn`]: one TCP connection (queue pair) as a worker [`nvmux_core::worker::WorkSource`].
//! * [`target`]: listeners, the discovery controller, subsystems by NQN.
//!
//! ```text
//!  host ──TCP──► listener thread ──accept──► Conn on a worker (one per queue)
//!                                               │ ICReq/ICResp, capsules, R2T/H2CData
//!                                               ├─ qid 0: Controller::admin (identify, logs,
//!                                               │         features, AER, properties)
//!                                               └─ qid>0: nvm::parse_io ─► nvm::prepare/submit
//!                                                         ─► Engine (validate, slots, stats)
//!                                                         ─► BlockQueue
//! ```

pub mod auth;
pub mod conn;
pub mod ctrl;
mod ffdhe;
#[doc(hidden)]
pub mod fuzzing;
pub mod host;
pub mod model;
pub mod nvm;
pub mod pdu;
pub mod ratelog;
pub mod target;

pub use ctrl::{Namespace, Subsystem, DISCOVERY_NQN};
pub use target::{DiscoveryPolicy, Target, TargetConfig, TargetStats};
