//! No allocation per I/O on a 2-leg mirror over memory devices: after a warm-up, 20 000
//! reads, writes, write zeroes and flushes at QD 16 on this thread must not move its
//! allocation count (the counting allocator the daemon installs).

use std::sync::Arc;
use std::time::{Duration, Instant};

use nvmux_backend::MemoryDevice;
use nvmux_core::alloc_count::{thread_allocs, CountingAlloc};
use nvmux_core::{BlockDevice, BlockQueue, IoCommand, Opcode, SgList, Status};
use nvmux_mirror::{Leg, LegState, MirrorConfig, MirrorDevice};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const QD: usize = 16;
const BS: usize = 512;

struct Load {
    q: Box<dyn BlockQueue>,
    bufs: Vec<Vec<u8>>,
    sgs: Vec<Option<SgList>>,
    fds: Vec<i32>,
    pfds: Vec<libc::pollfd>,
    done: Vec<(usize, Status)>,
    k: u64,
}

impl Load {
    fn submit(&mut self, slot: usize) {
        let k = self.k;
        self.k += 1;
        let mut sg = self.sgs[slot].take().unwrap_or_default();
        sg.clear();
        let nlb = 8 + (k % 3) as u32 * 8;
        let slba = (k * 97) % 2000 * 8;
        let op = match k % 16 {
            0 => Opcode::Flush,
            1 => Opcode::WriteZeroes,
            n if n % 2 == 0 => Opcode::Write,
            _ => Opcode::Read,
        };
        let (slba, nlb) = if op == Opcode::Flush {
            (0, 0)
        } else {
            (slba, nlb)
        };
        if op.has_data() {
            sg.push(self.bufs[slot].as_mut_ptr(), nlb as usize * BS);
        }
        self.q
            .submit(IoCommand::new(op, slba, nlb, slot as u64, sg));
    }

    fn run(&mut self, n: u64) {
        let mut issued = 0u64;
        let mut completed = 0u64;
        for s in 0..QD {
            self.submit(s);
            issued += 1;
        }
        self.q.kick();
        let end = Instant::now() + Duration::from_secs(60);
        while completed < n {
            assert!(Instant::now() < end, "stuck");
            let done = &mut self.done;
            let sgs = &mut self.sgs;
            let got = self.q.poll(&mut |c, st| {
                sgs[c.tag as usize] = Some(c.sg);
                done.push((c.tag as usize, st));
            });
            if got == 0 && self.q.may_sleep() {
                if self.q.take_fds_changed() {
                    self.fds.clear();
                    self.q.wait_fds(&mut self.fds);
                    self.pfds.clear();
                    for &fd in &self.fds {
                        self.pfds.push(libc::pollfd {
                            fd,
                            events: libc::POLLIN,
                            revents: 0,
                        });
                    }
                }
                // SAFETY: a valid pollfd array; bounded timeout.
                unsafe { libc::poll(self.pfds.as_mut_ptr(), self.pfds.len() as _, 10) };
                for &fd in &self.fds {
                    nvmux_core::eventfd::drain_fd(fd);
                }
            }
            while let Some((slot, st)) = self.done.pop() {
                assert!(st.is_ok(), "{st:?}");
                completed += 1;
                if issued < n {
                    self.submit(slot);
                    issued += 1;
                }
            }
            self.q.kick();
        }
    }
}

#[test]
fn a_two_leg_mirror_allocates_nothing_per_io() {
    let dir = std::env::temp_dir().join(format!("nvmux-mirror-za-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mk =
        || -> Arc<dyn BlockDevice> { Arc::new(MemoryDevice::new(16 << 20, 512, false).unwrap()) };
    let cfg = MirrorConfig {
        region_size: 64 << 10,
        assume_clean: vec!["b".into()],
        clear_delay: Duration::from_millis(20),
        ..MirrorConfig::default()
    };
    let m = MirrorDevice::open(
        vec![
            Leg {
                name: "a".into(),
                dev: mk(),
            },
            Leg {
                name: "b".into(),
                dev: mk(),
            },
        ],
        &dir.join("bitmap"),
        cfg,
    )
    .unwrap();
    let q = m.open_queue(QD as u32).unwrap();
    let mut fds = Vec::new();
    q.wait_fds(&mut fds);
    let mut load = Load {
        q,
        bufs: (0..QD).map(|_| vec![0x5a; 24 * BS]).collect(),
        sgs: (0..QD).map(|_| Some(SgList::with_capacity(4))).collect(),
        pfds: fds
            .iter()
            .map(|&fd| libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            })
            .collect(),
        fds,
        done: Vec::with_capacity(QD * 2),
        k: 0,
    };
    load.run(2000);
    // Regions clear and get set again during the measured run (clear_delay 20 ms): the
    // parked path is measured too.
    std::thread::sleep(Duration::from_millis(100));
    let before = thread_allocs();
    let probe: Vec<u8> = std::hint::black_box(Vec::with_capacity(64));
    assert!(
        thread_allocs() > before,
        "the counting allocator is installed"
    );
    drop(probe);
    let writes0 = m.status().bitmap_writes;
    assert_eq!(m.status().dirty_regions, 0, "idle regions cleared");
    let before = thread_allocs();
    load.run(20_000);
    let after = thread_allocs();
    assert_eq!(after - before, 0, "allocations on the I/O path");
    let st = m.status();
    assert!(st.legs.iter().all(|l| l.state == LegState::Healthy));
    assert!(
        st.bitmap_writes > writes0,
        "writes waited for bits during the measured run"
    );
    drop(load);
    m.shutdown();
    let _ = std::fs::remove_dir_all(&dir);
}
