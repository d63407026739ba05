//! Storage functions: `BlockDevice` layers stacked between a frontend and a volume.
//!
//! * [`crypt`]: AES-XTS-256 encryption (`aes-xts-plain64`, 512-byte sectors);
//! * [`qos`]: per-disk IOPS and bandwidth limits (token buckets);
//! * [`fair`]: weighted fair sharing of a backend between its disks (SFQ(D));
//! * [`keys`]: data keys, wrapped by a key-encryption key from a [`keys::KeyProvider`];
//! * [`keystore`]: the file of fixed slots that holds the wrapped data keys;
//! * [`secret`]: memory for keys: out of core dumps, locked, wiped.

pub mod crypt;
pub mod fair;
pub mod keys;
pub mod keystore;
pub mod keywrap;
pub mod qos;
pub mod secret;
pub mod xts;

pub use crypt::CryptDevice;
pub use fair::{Share, ShareGroup};
pub use qos::{Limits, Qos, QosDevice};
