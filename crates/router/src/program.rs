//! A loaded classifier: verified, linked to its maps and JIT-compiled with `rbpf`.
//!
//! Loading is `elf::load` → `verifier::verify` → link (each map reference becomes the
//! address of its [`ArrayMap`]) → JIT. The JIT writes into memory we map read-write and
//! then make read+execute only, so no page of the daemon is writable and executable
//! once a program runs. On targets without the rbpf JIT (anything but x86-64) the rbpf
//! interpreter runs the same program, with its run-time memory checks.

use std::sync::Arc;

use crate::ctx::{Ctx, CTX_SIZE};
use crate::elf::{self, MapDef, LD_DW_IMM, PSEUDO_MAP};
use crate::maps::ArrayMap;
use crate::verifier::{
    self, HELPER_ATOMIC_ADD, HELPER_KTIME_NS, HELPER_MAP_LOOKUP, HELPER_MAP_UPDATE, HELPER_PRANDOM,
};
use crate::{refuse, Result};

/// What the API shows of a program.
#[derive(Clone, Debug)]
pub struct ProgramInfo {
    pub section: String,
    pub instructions: usize,
    /// JIT-compiled (else interpreted).
    pub jit: bool,
    pub maps: Vec<MapDef>,
}

/// Memory for JIT code: mapped read-write for the compiler, then read+execute.
struct ExecMem(nvmux_core::anon::AnonMap);

impl ExecMem {
    fn new(len: usize) -> Result<ExecMem> {
        Ok(ExecMem(nvmux_core::anon::AnonMap::new(len, "JIT code")?))
    }

    fn seal(&self) -> Result<()> {
        self.0
            .protect(libc::PROT_READ | libc::PROT_EXEC, "JIT memory")
    }
}

/// The rbpf VM, shared by the disk's queues on several workers.
struct Vm(rbpf::EbpfVmRaw<'static>);

// SAFETY: after loading, the VM is only read: `execute_program[_jit](&self)` keeps each
// run's state on the calling thread. What makes rbpf's type neither Send nor Sync is the
// `Box<dyn Any>` of its stack-usage calculator, which nvmux never sets (it stays None).
unsafe impl Send for Vm {}
// SAFETY: as above.
unsafe impl Sync for Vm {}

pub struct Program {
    /// Borrows `code` and `exec` below (fields drop in order: the VM goes first).
    vm: Vm,
    _code: Box<[u8]>,
    _exec: Option<ExecMem>,
    maps: Vec<Arc<ArrayMap>>,
    pub info: ProgramInfo,
}

impl std::fmt::Debug for Program {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Program").field("info", &self.info).finish()
    }
}

const JIT: bool = cfg!(target_arch = "x86_64");

// Helpers. rbpf calls them with the program's r1..r5. The verifier proved the argument
// types before the program could run (see `verifier::HELPERS`).

fn h_map_lookup(map: u64, key: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: r1 is a map reference the linker wrote (the address of an ArrayMap the
    // Program keeps alive), r2 points to 4 written bytes (stack or map value).
    let (m, k) = unsafe {
        (
            &*(map as *const ArrayMap),
            std::ptr::read_unaligned(key as *const u32),
        )
    };
    m.value_ptr(k).map_or(0, |p| p as u64)
}

fn h_map_update(map: u64, key: u64, value: u64, flags: u64, _: u64) -> u64 {
    // SAFETY: as for lookup; r3 points to value_size readable bytes.
    let (m, k) = unsafe {
        (
            &*(map as *const ArrayMap),
            std::ptr::read_unaligned(key as *const u32),
        )
    };
    match flags {
        0 | 2 => {}
        1 => return (-libc::EEXIST) as i64 as u64, // every array entry exists
        _ => return (-libc::EINVAL) as i64 as u64,
    }
    let Some(dst) = m.value_ptr(k) else {
        return (-libc::E2BIG) as i64 as u64;
    };
    // SAFETY: value_size bytes are readable at `value` (verifier) and writable at `dst`
    // (inside the map's storage); the ranges may overlap if the value is the same entry.
    unsafe { std::ptr::copy(value as *const u8, dst, m.def.value_size as usize) };
    0
}

fn h_ktime_ns(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we pass.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn h_prandom(_: u64, _: u64, _: u64, _: u64, _: u64) -> u64 {
    thread_local!(static X: std::cell::Cell<u64> = std::cell::Cell::new(h_ktime_ns(0, 0, 0, 0, 0) | 1));
    X.with(|x| {
        let mut v = x.get();
        v ^= v << 13;
        v ^= v >> 7;
        v ^= v << 17;
        x.set(v);
        v as u32 as u64
    })
}

fn h_atomic_add(p: u64, delta: u64, _: u64, _: u64, _: u64) -> u64 {
    // SAFETY: r1 points to an 8-byte aligned u64 inside a map value (verifier); map
    // storage is AtomicU64 words.
    unsafe {
        (*(p as *const std::sync::atomic::AtomicU64))
            .fetch_add(delta, std::sync::atomic::Ordering::Relaxed)
    }
}

const HELPER_FNS: [(u32, rbpf::Helper); 5] = [
    (HELPER_MAP_LOOKUP, h_map_lookup),
    (HELPER_MAP_UPDATE, h_map_update),
    (HELPER_KTIME_NS, h_ktime_ns),
    (HELPER_PRANDOM, h_prandom),
    (HELPER_ATOMIC_ADD, h_atomic_add),
];

/// The helpers as JIT code calls them.
///
/// rbpf's x86-64 JIT calls helpers with the stack 8 bytes off the 16-byte alignment the
/// System V ABI requires (its prologue pushes five registers, reserves 512 bytes, then
/// pushes a return address for its exit path). Code that relies on the alignment (SSE
/// stores to the stack, clock_gettime's) then faults; found when a program calling
/// `nvmux_ktime_ns` crashed a test. So each helper is entered through a trampoline that
/// realigns the stack, and calls the `extern "C"` form of the helper.
#[cfg(target_arch = "x86_64")]
mod jit_abi {
    macro_rules! trampolines {
        ($($tramp:ident => $c:ident => $helper:path),* $(,)?) => {
            $(
                extern "C" fn $c(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64 {
                    $helper(a, b, c, d, e)
                }
                std::arch::global_asm!(
                    concat!(".pushsection .text.", stringify!($tramp), ",\"ax\",@progbits"),
                    concat!(".globl ", stringify!($tramp)),
                    concat!(".hidden ", stringify!($tramp)),
                    concat!(stringify!($tramp), ":"),
                    "push rbp",
                    "mov rbp, rsp",
                    "and rsp, -16",
                    "call {f}",
                    "mov rsp, rbp",
                    "pop rbp",
                    "ret",
                    ".popsection",
                    f = sym $c,
                );
            )*
            extern "C" {
                $(fn $tramp(a: u64, b: u64, c: u64, d: u64, e: u64) -> u64;)*
            }
        };
    }
    trampolines! {
        nvmux_tramp_map_lookup => c_map_lookup => super::h_map_lookup,
        nvmux_tramp_map_update => c_map_update => super::h_map_update,
        nvmux_tramp_ktime_ns => c_ktime_ns => super::h_ktime_ns,
        nvmux_tramp_prandom => c_prandom => super::h_prandom,
        nvmux_tramp_atomic_add => c_atomic_add => super::h_atomic_add,
    }

    type CHelper = unsafe extern "C" fn(u64, u64, u64, u64, u64) -> u64;

    /// The trampolines, typed as rbpf wants them.
    pub(super) fn helpers() -> [(u32, rbpf::Helper); 5] {
        let t: [(u32, CHelper); 5] = [
            (super::HELPER_MAP_LOOKUP, nvmux_tramp_map_lookup),
            (super::HELPER_MAP_UPDATE, nvmux_tramp_map_update),
            (super::HELPER_KTIME_NS, nvmux_tramp_ktime_ns),
            (super::HELPER_PRANDOM, nvmux_tramp_prandom),
            (super::HELPER_ATOMIC_ADD, nvmux_tramp_atomic_add),
        ];
        // SAFETY: only the JIT uses these entries, and it uses only their addresses, which
        // it calls with the System V convention the trampolines implement; before the
        // interpreter can run, `from_insns` registers the Rust helpers again.
        t.map(|(id, f)| {
            (id, unsafe {
                std::mem::transmute::<CHelper, rbpf::Helper>(f)
            })
        })
    }
}

fn vm_err(what: &str, e: impl std::fmt::Debug) -> crate::Error {
    crate::Error::new(
        nvmux_core::ErrorKind::InvalidArgument,
        format!("{what}: {e:?}"),
    )
}

impl Program {
    /// Load the program in `section` (or the only one) of an ELF object.
    pub fn load(object: &[u8], section: Option<&str>) -> Result<Program> {
        let obj = elf::load(object, section)?;
        Self::from_insns(obj.insns, obj.maps, obj.section)
    }

    /// Verify, link and compile instructions whose map references are `PSEUDO_MAP`.
    pub fn from_insns(insns: Vec<[u8; 8]>, defs: Vec<MapDef>, section: String) -> Result<Program> {
        verifier::verify(&insns, &defs)?;
        let maps: Vec<Arc<ArrayMap>> = defs.iter().map(|d| Arc::new(ArrayMap::new(d))).collect();
        // Link: a map reference becomes a plain 64-bit constant, the map's address.
        let mut code = Vec::with_capacity(insns.len() * 8);
        let mut i = 0;
        while i < insns.len() {
            let mut a = insns[i];
            if a[0] == LD_DW_IMM {
                let mut b = insns[i + 1];
                if a[1] >> 4 == PSEUDO_MAP {
                    let idx = u32::from_le_bytes([a[4], a[5], a[6], a[7]]) as usize;
                    let addr = Arc::as_ptr(&maps[idx]) as u64;
                    a[1] &= 0x0f;
                    a[4..8].copy_from_slice(&(addr as u32).to_le_bytes());
                    b[4..8].copy_from_slice(&((addr >> 32) as u32).to_le_bytes());
                }
                code.extend_from_slice(&a);
                code.extend_from_slice(&b);
                i += 2;
            } else {
                code.extend_from_slice(&a);
                i += 1;
            }
        }
        let code = code.into_boxed_slice();
        // SAFETY: `code` is a heap allocation that does not move and outlives the VM
        // (field order in Program); nothing else mutates it.
        let prog: &'static [u8] = unsafe { std::slice::from_raw_parts(code.as_ptr(), code.len()) };
        let mut vm =
            rbpf::EbpfVmRaw::new(Some(prog)).map_err(|e| vm_err("rbpf refused the program", e))?;
        #[cfg(target_arch = "x86_64")]
        for (id, f) in jit_abi::helpers() {
            vm.register_helper(id, f)
                .map_err(|e| vm_err("register helper", e))?;
        }
        for m in &maps {
            vm.register_allowed_memory(m.address_range());
        }
        let exec = if JIT {
            // x86-64 code for one eBPF instruction is at most a few dozen bytes.
            let len = (insns.len() * 64 + 4096).next_multiple_of(4096);
            let mem = ExecMem::new(len)?;
            // SAFETY: our fresh mapping of `len` bytes, which outlives the VM (field
            // order); the compiler is its only writer, before `seal`.
            let slice: &'static mut [u8] =
                unsafe { std::slice::from_raw_parts_mut(mem.0.as_ptr(), mem.0.len()) };
            vm.set_jit_exec_memory(slice)
                .map_err(|e| vm_err("JIT memory", e))?;
            let compiled =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| vm.jit_compile()));
            match compiled {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return Err(vm_err("JIT compilation failed", e)),
                Err(_) => return refuse("JIT compilation failed (the compiler panicked)"),
            }
            mem.seal()?;
            Some(mem)
        } else {
            None
        };
        // The JIT code holds the trampolines' addresses; the interpreter calls what the
        // VM has registered when it runs: the helpers themselves.
        for (id, f) in HELPER_FNS {
            vm.register_helper(id, f)
                .map_err(|e| vm_err("register helper", e))?;
        }
        Ok(Program {
            vm: Vm(vm),
            _code: code,
            _exec: exec,
            info: ProgramInfo {
                section,
                instructions: insns.len(),
                jit: JIT,
                maps: defs,
            },
            maps,
        })
    }

    /// True if the program calls helper `id` anywhere.
    pub fn calls(&self, id: u32) -> bool {
        self._code
            .chunks_exact(8)
            .any(|i| i[0] == 0x85 && i[1] == 0 && i[4..8] == id.to_le_bytes())
    }

    pub fn maps(&self) -> &[Arc<ArrayMap>] {
        &self.maps
    }

    pub fn map(&self, name: &str) -> Option<&Arc<ArrayMap>> {
        self.maps.iter().find(|m| m.def.name == name)
    }

    /// Run the program on `ctx`; `None` if the interpreter stopped it (it never does for
    /// a verified program; the JIT has no failure path).
    #[inline]
    pub fn run(&self, ctx: &mut Ctx) -> Option<u64> {
        let bytes = ctx.as_bytes_mut();
        // SAFETY: the slice covers `ctx` and is used only during this call; rbpf asks for
        // its own lifetime parameter ('static here) but does not keep the slice.
        let mem: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr(), CTX_SIZE) };
        if JIT {
            // SAFETY: the program was verified: it is bounded, touches only its context,
            // its stack and its maps' values, and calls only the helpers above with
            // arguments of the types they need.
            unsafe { self.vm.0.execute_program_jit(mem) }.ok()
        } else {
            self.vm.0.execute_program(mem).ok()
        }
    }

    /// Run with the interpreter, which checks every memory access at run time (for tests
    /// and fuzzing: a verified program must never fail here).
    pub fn run_interpreted(&self, ctx: &mut Ctx) -> std::result::Result<u64, String> {
        let bytes = ctx.as_bytes_mut();
        // SAFETY: as in `run`.
        let mem: &'static mut [u8] =
            unsafe { std::slice::from_raw_parts_mut(bytes.as_mut_ptr(), CTX_SIZE) };
        self.vm.0.execute_program(mem).map_err(|e| format!("{e:?}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ctx::{Route, HOOK};
    use crate::elf::MapDef;
    use crate::verifier::ins;

    /// A program counting commands per opcode in map slot `opcode`, adding 8 to slba, and
    /// returning FAST|HOOK; run by the JIT and the interpreter.
    #[test]
    fn jit_and_interpreter_agree() {
        let def = MapDef {
            name: "count".into(),
            kind: 2,
            key_size: 4,
            value_size: 8,
            max_entries: 16,
            flags: 0,
        };
        let p = vec![
            ins(0xbf, 6, 1, 0, 0),   // r6 = ctx
            ins(0x71, 2, 1, 8, 0),   // r2 = opcode
            ins(0x63, 10, 2, -4, 0), // key = r2
            ins(0xbf, 2, 10, 0, 0),  // r2 = r10
            ins(0x07, 2, 0, 0, -4),  // r2 -= 4
            ins(LD_DW_IMM, 1, PSEUDO_MAP, 0, 0),
            [0; 8],
            ins(0x85, 0, 0, 0, HELPER_MAP_LOOKUP as i32),
            ins(0x15, 0, 0, 3, 0), // if r0 == 0 goto +3
            ins(0xbf, 1, 0, 0, 0), // r1 = value
            ins(0xb7, 2, 0, 0, 1), // r2 = 1
            ins(0x85, 0, 0, 0, HELPER_ATOMIC_ADD as i32),
            ins(0x79, 3, 6, 16, 0), // r3 = slba
            ins(0x07, 3, 0, 0, 8),  // r3 += 8
            ins(0x7b, 6, 3, 16, 0), // slba = r3
            ins(0xb7, 0, 0, 0, (HOOK | Route::Fast as u64) as i32),
            [0x95, 0, 0, 0, 0, 0, 0, 0],
        ];
        let prog = Program::from_insns(p, vec![def], "t".into()).expect("load");
        let mut c = Ctx {
            opcode: 2,
            slba: 100,
            ..Ctx::default()
        };
        assert_eq!(prog.run(&mut c), Some(HOOK | 1));
        assert_eq!(c.slba, 108);
        // Every helper through the JIT (the trampolines realign the stack).
        let t = Program::from_insns(
            vec![
                ins(0x85, 0, 0, 0, HELPER_KTIME_NS as i32),
                ins(0xbf, 6, 0, 0, 0),
                ins(0x85, 0, 0, 0, HELPER_PRANDOM as i32),
                ins(0xbf, 0, 6, 0, 0),
                [0x95, 0, 0, 0, 0, 0, 0, 0],
            ],
            vec![],
            "t".into(),
        )
        .expect("load");
        let now = h_ktime_ns(0, 0, 0, 0, 0);
        let r = t.run(&mut Ctx::default()).expect("run");
        assert!(r >= now && r < now + 10_000_000_000, "ktime {r} vs {now}");
        let mut c2 = Ctx {
            opcode: 2,
            slba: 100,
            ..Ctx::default()
        };
        assert_eq!(prog.run_interpreted(&mut c2), Ok(HOOK | 1));
        assert_eq!(c, c2);
        let m = prog.map("count").expect("map");
        assert_eq!(m.read(2).unwrap(), 2u64.to_le_bytes().to_vec());
        assert_eq!(prog.info.instructions, 17);
    }
}
