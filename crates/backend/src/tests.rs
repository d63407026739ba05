use super::*;
use nvmux_core::{Opcode, SgList};
use std::os::fd::FromRawFd;

fn run(q: &mut dyn BlockQueue, cmd: IoCommand) -> (IoCommand, Status) {
    q.submit(cmd);
    q.kick();
    let mut out = None;
    // Generous (30 s): a busy disk under a parallel test run can take long; this bounds a
    // hang, it does not measure speed.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while std::time::Instant::now() < deadline {
        q.poll(&mut |c, s| out = Some((c, s)));
        if let Some(o) = out.take() {
            return o;
        }
        match q.completion_fd() {
            Some(fd) => {
                let mut p = libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd on the stack; the fd belongs to the queue.
                unsafe { libc::poll(&mut p, 1, 100) };
            }
            None => std::thread::yield_now(),
        }
    }
    panic!("command did not complete in 30 s");
}

fn cmd(op: Opcode, slba: u64, nlb: u32, buf: &mut [u8]) -> IoCommand {
    let mut sg = SgList::default();
    if op.has_data() {
        sg.push(buf.as_mut_ptr(), buf.len());
    }
    IoCommand::new(op, slba, nlb, 7, sg)
}

fn exercise(dev: &dyn BlockDevice) {
    let info = dev.info().clone();
    let bs = info.block_size as usize;
    let mut q = dev.open_queue(8).unwrap();
    let mut w = vec![0xa5u8; bs * 2];
    let (c, s) = run(&mut *q, cmd(Opcode::Write, 3, 2, &mut w));
    assert_eq!((c.tag, s), (7, Status::SUCCESS));
    let mut r = vec![0u8; bs * 2];
    let (_, s) = run(&mut *q, cmd(Opcode::Read, 3, 2, &mut r));
    assert_eq!(s, Status::SUCCESS);
    assert_eq!(r, w);
    let (_, s) = run(&mut *q, cmd(Opcode::Flush, 0, 0, &mut []));
    assert_eq!(s, Status::SUCCESS);
    let (_, s) = run(&mut *q, cmd(Opcode::WriteZeroes, 3, 1, &mut []));
    assert_eq!(s, Status::SUCCESS);
    let (_, s) = run(&mut *q, cmd(Opcode::Deallocate, 4, 1, &mut []));
    assert_eq!(s, Status::SUCCESS);
    let (_, s) = run(&mut *q, cmd(Opcode::Read, 3, 2, &mut r));
    assert_eq!(s, Status::SUCCESS);
    assert!(
        r.iter().all(|&b| b == 0),
        "zeroed and deallocated blocks read as zeros"
    );
    // Last block, misaligned buffer (bounce path under O_DIRECT).
    let last = info.num_blocks - 1;
    let mut big = vec![0x3cu8; bs + 1];
    let (_, s) = run(&mut *q, cmd(Opcode::Write, last, 1, &mut big[1..]));
    assert_eq!(s, Status::SUCCESS);
    let mut rb = vec![0u8; bs + 1];
    let (_, s) = run(&mut *q, cmd(Opcode::Read, last, 1, &mut rb[1..]));
    assert_eq!(s, Status::SUCCESS);
    assert!(rb[1..].iter().all(|&b| b == 0x3c));
    assert_eq!(q.in_flight(), 0);
}

#[test]
fn file_on_tmp() {
    let dir = std::env::temp_dir().join(format!("nvmux-backend-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    for bs in [512u32, 4096] {
        let p = dir.join(format!("f{bs}.img"));
        let _ = std::fs::remove_file(&p);
        let dev = FileDevice::open(
            &p,
            &FileOptions {
                size: Some(1 << 20),
                block_size: Some(bs),
                ..Default::default()
            },
        )
        .unwrap();
        exercise(&dev);
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn file_on_shm() {
    let p = std::path::PathBuf::from(format!("/dev/shm/nvmux-backend-{}.img", std::process::id()));
    let dev = FileDevice::open(
        &p,
        &FileOptions {
            size: Some(1 << 20),
            ..Default::default()
        },
    )
    .unwrap();
    exercise(&dev);
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn memory() {
    exercise(&MemoryDevice::new(1 << 20, 512, false).unwrap());
}

#[test]
fn null() {
    let d = NullDevice::new(1 << 20, 4096, false).unwrap();
    let mut q = d.open_queue(4).unwrap();
    let mut b = vec![0u8; 4096];
    let (_, s) = run(&mut *q, cmd(Opcode::Read, 0, 1, &mut b));
    assert_eq!(s, Status::SUCCESS);
}

#[test]
fn bad_options() {
    assert!(NullDevice::new(1000, 512, false).is_err());
    assert!(NullDevice::new(4096, 1024, false).is_err());
    assert!(NullDevice::new(4096, 512, true).unwrap().info().read_only);
    assert!(MemoryDevice::new(4096, 512, true).unwrap().info().read_only);
    let p = std::path::Path::new("/nonexistent-dir/x.img");
    assert!(FileDevice::open(p, &FileOptions::default()).is_err());
}

#[test]
fn refuses_shrinking_a_file() {
    let p = std::env::temp_dir().join(format!("nvmux-shrink-{}.img", std::process::id()));
    std::fs::write(&p, vec![1u8; 8192]).unwrap();
    let e = FileDevice::open(
        &p,
        &FileOptions {
            size: Some(4096),
            ..Default::default()
        },
    );
    assert!(e.is_err());
    assert_eq!(std::fs::metadata(&p).unwrap().len(), 8192, "nothing lost");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn odd_sized_file_rounds_down_and_reopens() {
    let p = std::env::temp_dir().join(format!("nvmux-odd-{}.img", std::process::id()));
    std::fs::write(&p, vec![1u8; 1000]).unwrap();
    let d = FileDevice::open(&p, &FileOptions::default()).unwrap();
    assert_eq!(d.info().size_bytes(), 512);
    let again = FileDevice::open(
        &p,
        &FileOptions {
            size: Some(512),
            block_size: Some(512),
            ..Default::default()
        },
    );
    assert!(again.is_ok(), "a recorded rounded-down size reopens");
    std::fs::remove_file(&p).unwrap();
}

#[test]
fn bad_size_creates_nothing() {
    let p = std::env::temp_dir().join(format!("nvmux-badsize-{}.img", std::process::id()));
    let _ = std::fs::remove_file(&p);
    assert!(FileDevice::open(
        &p,
        &FileOptions {
            size: Some(100),
            block_size: Some(512),
            ..Default::default()
        }
    )
    .is_err());
    assert!(!p.exists(), "no file left behind");
}

/// A queue dropped while the kernel holds a command (a read of an empty pipe, which
/// never completes by itself) cancels it and waits for its completion before the
/// command's buffer is freed.
#[test]
fn a_queue_dropped_with_a_command_in_the_kernel_cancels_and_waits() {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into a valid array.
    assert_eq!(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) }, 0);
    // SAFETY: both descriptors are fresh and owned here.
    let (rd, _wr) = unsafe {
        (
            std::fs::File::from_raw_fd(fds[0]),
            std::os::fd::OwnedFd::from_raw_fd(fds[1]),
        )
    };
    let mut q = uring::UringQueue::new(
        std::sync::Arc::new(rd),
        512,
        false,
        std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true)),
        4,
    )
    .unwrap();
    q.set_drain_wait(std::time::Duration::from_secs(30));
    let leaked = uring::leaked_commands();
    let mut buf = nvmux_core::AlignedBuf::new(4096);
    let c = IoCommand::new(Opcode::Read, 0, 8, 1, buf.sg(0, 4096));
    q.submit(c);
    q.kick();
    assert_eq!(q.in_flight(), 1);
    // Nothing completes: the pipe is empty.
    std::thread::sleep(std::time::Duration::from_millis(50));
    let mut seen = 0;
    q.poll(&mut |_, _| seen += 1);
    assert_eq!(seen, 0);
    drop(q);
    assert_eq!(
        uring::leaked_commands(),
        leaked,
        "the read was cancelled and reaped, not leaked"
    );
    // The buffer is ours again; writing it cannot race the kernel.
    buf.as_mut_slice().fill(1);
}
