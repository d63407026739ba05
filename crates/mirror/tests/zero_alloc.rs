//! No allocation per I/O on a 2-leg mirror over memory devices: after a warm-up, 20 000
//! reads, writes, write zeroes and flushes at QD 16 on this thread must not move its
//! allocation count (the counting allocator the daemon installs).

use std::sync::Arc;
use std::time::Duration;

use nvmux_backend::MemoryDevice;
use nvmux_core::alloc_count::{thread_allocs, CountingAlloc, MixedLoad};
use nvmux_core::BlockDevice;
use nvmux_mirror::{Leg, LegState, MirrorConfig, MirrorDevice};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

const QD: usize = 16;
const BS: u32 = 512;

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
    // Commands of 8, 16 and 24 blocks; no FUA.
    let mut load = MixedLoad::new(q, QD, BS, 3, None);
    load.run(2000, Duration::from_secs(60)).unwrap();
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
    load.run(20_000, Duration::from_secs(60)).unwrap();
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
