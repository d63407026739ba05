//! The NVM command set's I/O semantics, free of transport code: what an NVM I/O command
//! (Read, Write, Flush, Write Zeroes, Dataset Management) becomes on the frontend engine
//! ([`nvmux_core::engine::Engine`]). NVMe/TCP ([`crate::conn`]) uses it; the vfio-user
//! PCIe controller will, with guest memory where NVMe/TCP has its command buffers.
//!
//! ```text
//!  SQE ─► parse_io ─► IoPlan ─► prepare(engine, slot, disk) ─► Need (the memory it wants)
//!          opcode, MDTS,          the engine's one validation     Data / Zeros / Ranges
//!          DSM on read-only        (range, read-only, live size)
//!  transport: gets the memory (host data arrives, R2T, PRPs), fills the SG list for Data
//!  submit(engine, slot, disk, plan, mem) ─► block command(s)
//!          Write Zeroes on a disk without it: a write of zeros (counted as "other")
//!          Dataset Management/deallocate: one Deallocate per range, all checked first
//! ```

use nvmux_core::engine::{DiskId, Engine, SlotId};
use nvmux_core::stats::OpClass;
use nvmux_core::{Opcode, Status};

use crate::ctrl::{Sqe, MAX_TRANSFER};

/// Dataset Management ranges in one command at most (NR is 8 bits, 0-based).
pub const DSM_MAX_RANGES: usize = 256;

/// What an NVM I/O command becomes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoPlan {
    /// One command: read or write (data moves), flush, write zeroes.
    One {
        op: Opcode,
        slba: u64,
        nlb: u32,
        fua: bool,
    },
    /// Dataset Management: the ranges follow in `ranges` × 16 bytes of host data; only
    /// deallocate does anything.
    Dsm { ranges: usize, deallocate: bool },
}

impl IoPlan {
    /// Bytes of data the command moves between host and controller.
    pub fn data_len(&self, block_size: u32) -> usize {
        match self {
            IoPlan::One { op, nlb, .. } if op.has_data() => *nlb as usize * block_size as usize,
            IoPlan::Dsm { ranges, .. } => ranges * 16,
            _ => 0,
        }
    }
}

/// Decode an NVM command: opcode, fields, the transfer limit (MDTS). The range and the
/// disk's read-only flag are checked by [`prepare`] (the engine's validation, against the
/// disk's live size); Dataset Management on a read-only namespace is refused here, since
/// it may carry no range to check.
pub fn parse_io(sqe: Sqe, block_size: u32, read_only: bool) -> Result<IoPlan, Status> {
    let slba = (sqe.cdw(11) as u64) << 32 | sqe.cdw(10) as u64;
    let nlb = (sqe.cdw(12) & 0xffff) + 1;
    let fua = sqe.cdw(12) & (1 << 30) != 0;
    let op = match sqe.opcode() {
        0x00 => {
            return Ok(IoPlan::One {
                op: Opcode::Flush,
                slba: 0,
                nlb: 0,
                fua: false,
            })
        }
        0x01 => Opcode::Write,
        0x02 => Opcode::Read,
        0x08 => Opcode::WriteZeroes,
        0x09 => {
            if read_only {
                return Err(Status::WRITE_PROTECTED);
            }
            let ranges = (sqe.cdw(10) & 0xff) as usize + 1;
            return Ok(IoPlan::Dsm {
                ranges,
                deallocate: sqe.cdw(11) & (1 << 2) != 0,
            });
        }
        _ => return Err(Status::INVALID_OPCODE),
    };
    if op.has_data() && nlb as usize * block_size as usize > MAX_TRANSFER {
        return Err(Status::INVALID_FIELD);
    }
    Ok(IoPlan::One { op, slba, nlb, fua })
}

/// The ranges of a Dataset Management command: (slba, nlb).
pub fn dsm_ranges(data: &[u8]) -> impl Iterator<Item = (u64, u32)> + '_ {
    data.chunks_exact(16).map(|r| {
        let le = |o: usize, n: usize| {
            r[o..o + n]
                .iter()
                .rev()
                .fold(0u64, |a, &b| a << 8 | b as u64)
        };
        (le(8, 8), le(4, 4) as u32)
    })
}

/// The memory a prepared command needs from its transport before [`submit`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Need {
    /// Nothing (Flush, a Write Zeroes the disk does itself).
    #[default]
    Nothing,
    /// The command's data, `len` bytes: from the host (Write) or for it (Read). The
    /// transport points the slot's SG list at them.
    Data(usize),
    /// `len` bytes of writable scratch memory: a Write Zeroes on a disk without it runs
    /// as a write of zeros from there.
    Zeros(usize),
    /// The Dataset Management range list, `len` bytes from the host.
    Ranges(usize),
}

/// Check `plan` against disk `d` (the engine's validation: range, read-only, live size)
/// and remember it as slot `i`'s command; say what memory it needs.
pub fn prepare<P: Default>(
    eng: &mut Engine<P>,
    i: SlotId,
    d: DiskId,
    plan: &IoPlan,
) -> Result<Need, Status> {
    let info = eng.info(d).ok_or(Status::INVALID_NAMESPACE)?;
    let (bs, native_zeroes) = (info.block_size as usize, info.write_zeroes);
    match *plan {
        IoPlan::One {
            op: Opcode::WriteZeroes,
            slba,
            nlb,
            fua,
        } if !native_zeroes => {
            // Emulated with a write of zeros, bounded like any write.
            let len = nlb as usize * bs;
            if len > MAX_TRANSFER {
                return Err(Status::INVALID_FIELD);
            }
            eng.prepare(i, d, Opcode::Write, slba, nlb, fua)?;
            eng.set_class(i, OpClass::Other);
            Ok(Need::Zeros(len))
        }
        IoPlan::One { op, slba, nlb, fua } => {
            eng.prepare(i, d, op, slba, nlb, fua)?;
            Ok(if op.has_data() {
                Need::Data(nlb as usize * bs)
            } else {
                Need::Nothing
            })
        }
        IoPlan::Dsm { ranges, .. } => Ok(Need::Ranges(ranges * 16)),
    }
}

/// Send slot `i`'s prepared command. `mem` is the memory [`prepare`] asked for with
/// [`Need::Zeros`] (it is zeroed here) or [`Need::Ranges`] (the range list); `None` for
/// [`Need::Data`] (the transport has filled the SG list) and [`Need::Nothing`].
///
/// Returns the block commands sent: 0 means there was nothing to do (a Dataset
/// Management without deallocate, or on a disk that cannot discard: it is advisory), and
/// the transport completes the command with success at once.
pub fn submit<P: Default>(
    eng: &mut Engine<P>,
    i: SlotId,
    d: DiskId,
    plan: &IoPlan,
    mem: Option<&mut [u8]>,
) -> Result<u32, Status> {
    match *plan {
        IoPlan::Dsm { ranges, deallocate } => {
            let discard = eng.info(d).ok_or(Status::INVALID_NAMESPACE)?.discard;
            if !(deallocate && discard) {
                return Ok(0);
            }
            let data: &[u8] = mem.map_or(&[], |m| &*m);
            let data = &data[..(ranges.min(DSM_MAX_RANGES) * 16).min(data.len())];
            let mut list = [(0u64, 0u32); DSM_MAX_RANGES];
            let mut k = 0;
            for (slot, r) in list.iter_mut().zip(dsm_ranges(data)) {
                *slot = r;
                k += 1;
            }
            eng.submit_ranges(i, d, Opcode::Deallocate, &list[..k])
        }
        IoPlan::One { .. } => {
            if let Some(m) = mem {
                m.fill(0);
                eng.slot_mut(i).sg_mut().push(m.as_mut_ptr(), m.len());
            }
            eng.submit(i)?;
            Ok(1)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nvmux_core::stats::DiskStats;
    use nvmux_core::{BlockDevice, BlockQueue, DeviceInfo, IoCommand};
    use std::os::fd::RawFd;
    use std::sync::{Arc, Mutex};

    /// What reached the mock disk: opcode, slba, nlb, data.
    type Log = Arc<Mutex<Vec<(Opcode, u64, u32, Vec<u8>)>>>;

    /// A mock disk that records what reaches it and completes it at the next poll.
    struct Dev {
        info: DeviceInfo,
        log: Log,
    }
    struct Q {
        log: Log,
        out: Vec<IoCommand>,
    }
    impl BlockDevice for Dev {
        fn info(&self) -> &DeviceInfo {
            &self.info
        }
        fn open_queue(&self, _: u32) -> nvmux_core::Result<Box<dyn BlockQueue>> {
            Ok(Box::new(Q {
                log: self.log.clone(),
                out: Vec::new(),
            }))
        }
        fn describe(&self) -> String {
            "mock".into()
        }
    }
    impl BlockQueue for Q {
        fn submit(&mut self, c: IoCommand) {
            let mut data = Vec::new();
            for v in c.sg.segments() {
                // SAFETY: the test's SG lists point at live buffers of these lengths.
                data.extend_from_slice(unsafe {
                    std::slice::from_raw_parts(v.iov_base as *const u8, v.iov_len)
                });
            }
            self.log
                .lock()
                .unwrap()
                .push((c.opcode, c.slba, c.nlb, data));
            self.out.push(c);
        }
        fn kick(&mut self) {}
        fn poll(&mut self, done: &mut dyn FnMut(IoCommand, Status)) -> usize {
            let n = self.out.len();
            for c in self.out.drain(..) {
                done(c, Status::SUCCESS);
            }
            n
        }
        fn in_flight(&self) -> usize {
            self.out.len()
        }
        fn completion_fd(&self) -> Option<RawFd> {
            None
        }
    }

    fn engine(zeroes: bool, discard: bool) -> (Engine<()>, DiskId, Log) {
        let log: Log = Arc::default();
        let dev = Arc::new(Dev {
            info: DeviceInfo {
                block_size: 512,
                num_blocks: 100,
                read_only: false,
                discard,
                write_zeroes: zeroes,
                volatile_cache: true,
                max_transfer: 1 << 20,
            },
            log: log.clone(),
        });
        let mut e = Engine::new(4);
        let d = e
            .add_disk(dev, &Arc::new(DiskStats::default()), 1, 4)
            .unwrap();
        (e, d, log)
    }

    fn sqe(op: u8, cdw10: u32, cdw11: u32, cdw12: u32) -> [u8; 64] {
        let mut s = [0u8; 64];
        s[0] = op;
        s[40..44].copy_from_slice(&cdw10.to_le_bytes());
        s[44..48].copy_from_slice(&cdw11.to_le_bytes());
        s[48..52].copy_from_slice(&cdw12.to_le_bytes());
        s
    }

    #[test]
    fn write_zeroes_is_emulated_with_a_write_of_zeros_when_the_disk_cannot() {
        let (mut e, d, log) = engine(false, true);
        let s = sqe(0x08, 10, 0, 3);
        let plan = parse_io(Sqe(&s), 512, false).unwrap();
        let i = e.alloc().unwrap();
        assert_eq!(prepare(&mut e, i, d, &plan), Ok(Need::Zeros(2048)));
        let mut scratch = vec![0xffu8; 2048];
        assert_eq!(submit(&mut e, i, d, &plan, Some(&mut scratch)), Ok(1));
        let l = log.lock().unwrap();
        assert_eq!(l[0].0, Opcode::Write);
        assert_eq!((l[0].1, l[0].2), (10, 4));
        assert!(l[0].3.len() == 2048 && l[0].3.iter().all(|&b| b == 0));
        drop(l);
        // Natively: no memory, the command as it is.
        let (mut e, d, log) = engine(true, true);
        let i = e.alloc().unwrap();
        assert_eq!(prepare(&mut e, i, d, &plan), Ok(Need::Nothing));
        assert_eq!(submit(&mut e, i, d, &plan, None), Ok(1));
        assert_eq!(log.lock().unwrap()[0].0, Opcode::WriteZeroes);
        // Out of range: the engine refuses it before any memory is asked for.
        let s = sqe(0x08, 99, 0, 3);
        let plan = parse_io(Sqe(&s), 512, false).unwrap();
        assert_eq!(prepare(&mut e, i, d, &plan), Err(Status::LBA_OUT_OF_RANGE));
    }

    #[test]
    fn dataset_management_fans_out_after_checking_every_range() {
        let (mut e, d, log) = engine(true, true);
        let s = sqe(0x09, 2, 1 << 2, 0);
        let plan = parse_io(Sqe(&s), 512, false).unwrap();
        assert_eq!(
            plan,
            IoPlan::Dsm {
                ranges: 3,
                deallocate: true
            }
        );
        let range = |slba: u64, nlb: u32| {
            let mut r = [0u8; 16];
            r[4..8].copy_from_slice(&nlb.to_le_bytes());
            r[8..16].copy_from_slice(&slba.to_le_bytes());
            r
        };
        let i = e.alloc().unwrap();
        assert_eq!(prepare(&mut e, i, d, &plan), Ok(Need::Ranges(48)));
        let mut list = [range(0, 8), range(50, 0), range(90, 10)].concat();
        assert_eq!(submit(&mut e, i, d, &plan, Some(&mut list)), Ok(2));
        e.reap();
        assert_eq!(e.next_completion(), Some((i, Status::SUCCESS)));
        e.release(i);
        let got: Vec<_> = log
            .lock()
            .unwrap()
            .iter()
            .map(|c| (c.0, c.1, c.2))
            .collect();
        assert_eq!(
            got,
            vec![(Opcode::Deallocate, 0, 8), (Opcode::Deallocate, 90, 10)]
        );
        // One range past the end: nothing is deallocated.
        let i = e.alloc().unwrap();
        let mut list = [range(0, 8), range(95, 10), range(1, 1)].concat();
        assert_eq!(
            submit(&mut e, i, d, &plan, Some(&mut list)),
            Err(Status::LBA_OUT_OF_RANGE)
        );
        assert_eq!(log.lock().unwrap().len(), 2);
        // Without the deallocate attribute, or on a disk that cannot discard: advisory.
        let s = sqe(0x09, 0, 0, 0);
        let p2 = parse_io(Sqe(&s), 512, false).unwrap();
        assert_eq!(submit(&mut e, i, d, &p2, Some(&mut list)), Ok(0));
        let (mut e, d, _) = engine(true, false);
        let i = e.alloc().unwrap();
        assert_eq!(submit(&mut e, i, d, &plan, Some(&mut list)), Ok(0));
        // On a read-only namespace Dataset Management is refused outright.
        assert_eq!(parse_io(Sqe(&s), 512, true), Err(Status::WRITE_PROTECTED));
    }
}
