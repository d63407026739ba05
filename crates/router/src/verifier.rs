//! The load-time verifier. A classifier runs JIT-compiled inside a worker thread with no
//! run-time checks, so everything that keeps it safe is proved here, before it runs:
//!
//! * **Bounded.** The control-flow graph has no cycle (a depth-first search finds no
//!   back edge; a backward jump that does not close a loop, such as clang's jump to a
//!   shared exit, is fine), so a run executes each instruction at most once: at most
//!   [`crate::elf::MAX_INSNS`] instructions. Loops are refused (unroll them).
//! * **Memory-safe.** Each register has a type: uninitialised, scalar (with its value when
//!   known), or a pointer to the context, the stack, a map, or a map value (maybe null)
//!   with a constant offset. Loads and stores go only through pointers, at constant
//!   offsets inside the object pointed to: the 64-byte context (stores only into its
//!   writable fields), the 512-byte stack, a map value. A map value must be checked
//!   against null first. Nothing reads a stack byte that was not written.
//! * **No pointer leaks.** Pointers are never stored into the context or a map, never
//!   truncated, combined or compared except for the null check, and never returned:
//!   neither the guest's external function nor the operator can learn an address.
//! * **Helpers** are called with arguments of the types they need ([`HELPERS`]).
//!
//! The analysis is one pass over the instructions in a topological order of the graph
//! (reverse post-order of the search), so every predecessor of an instruction is seen
//! before it. Where paths meet, register types are joined; a register whose types differ
//! on the paths is unusable after the join.

use crate::ctx::{self, CTX_SIZE};
use crate::elf::{MapDef, LD_DW_IMM, PSEUDO_MAP};
use crate::{refuse, Result};

const STACK: i64 = 512;

/// Helper numbers (the Linux numbers where a Linux helper of the same meaning exists).
pub const HELPER_MAP_LOOKUP: u32 = 1;
pub const HELPER_MAP_UPDATE: u32 = 2;
pub const HELPER_KTIME_NS: u32 = 5;
pub const HELPER_PRANDOM: u32 = 7;
pub const HELPER_ATOMIC_ADD: u32 = 1000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arg {
    Map,
    /// A pointer to `key_size` readable bytes of the map in argument 1.
    Key,
    /// A pointer to `value_size` readable bytes of the map in argument 1.
    Value,
    Scalar,
    /// A pointer to an 8-byte aligned `u64` inside a map value.
    ValueU64,
}

/// (number, name, arguments). Each returns a scalar, except lookup (a map value or null).
pub const HELPERS: [(u32, &str, &[Arg]); 5] = [
    (HELPER_MAP_LOOKUP, "nvmux_map_lookup", &[Arg::Map, Arg::Key]),
    (
        HELPER_MAP_UPDATE,
        "nvmux_map_update",
        &[Arg::Map, Arg::Key, Arg::Value, Arg::Scalar],
    ),
    (HELPER_KTIME_NS, "nvmux_ktime_ns", &[]),
    (HELPER_PRANDOM, "nvmux_prandom_u32", &[]),
    (
        HELPER_ATOMIC_ADD,
        "nvmux_atomic_add",
        &[Arg::ValueU64, Arg::Scalar],
    ),
];

/// Limits on maps: key a `u32` index, values up to 4 KiB, 16 MiB in all per program.
pub const MAX_VALUE_SIZE: u32 = 4096;
pub const MAX_ENTRIES: u32 = 65536;
pub const MAX_MAP_BYTES: u64 = 16 << 20;
pub const MAP_ARRAY: u32 = 2;

/// Check the map definitions an object brings.
pub fn check_maps(maps: &[MapDef]) -> Result<()> {
    let mut total = 0u64;
    for m in maps {
        let bad = |why: String| refuse(format!("map {:?}: {why}", m.name));
        if m.kind != MAP_ARRAY {
            return bad(format!(
                "type {} is not supported (only NVMUX_MAP_ARRAY, {MAP_ARRAY})",
                m.kind
            ));
        }
        if m.key_size != 4 {
            return bad(format!(
                "key size {} (an array's key is a 4-byte index)",
                m.key_size
            ));
        }
        if m.value_size == 0 || m.value_size > MAX_VALUE_SIZE {
            return bad(format!(
                "value size {} (1 to {MAX_VALUE_SIZE} bytes)",
                m.value_size
            ));
        }
        if m.max_entries == 0 || m.max_entries > MAX_ENTRIES {
            return bad(format!("{} entries (1 to {MAX_ENTRIES})", m.max_entries));
        }
        if m.flags != 0 {
            return bad(format!("flags {:#x} (must be 0)", m.flags));
        }
        total += m.value_size.next_multiple_of(8) as u64 * m.max_entries as u64;
    }
    if total > MAX_MAP_BYTES {
        return refuse(format!(
            "the maps need {total} bytes; at most {MAX_MAP_BYTES} are allowed"
        ));
    }
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum T {
    Uninit,
    /// A number, with its value when known.
    Scalar(Option<u64>),
    Ctx(i64),
    Stack(i64),
    /// The map itself (only a helper argument).
    Map(u32),
    /// A map value, known to be non-null.
    Value(u32, i64),
    /// A map value or null; the id links the copies a null check refines together.
    ValueOrNull(u32, i64, u32),
}

impl T {
    fn is_pointer(self) -> bool {
        !matches!(self, T::Uninit | T::Scalar(_))
    }
}

/// One 8-byte stack slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Slot {
    /// Bytes of plain data; bit i set: byte i was written.
    Bytes(u8),
    /// A whole register spilled with an aligned 8-byte store.
    Spill(T),
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct State {
    regs: [T; 11],
    stack: [Slot; (STACK / 8) as usize],
}

fn join_t(a: T, b: T, ids: &mut Vec<((u32, u32), u32)>, next_id: &mut u32) -> T {
    let mut fresh = |x: u32, y: u32| {
        if let Some(&(_, id)) = ids.iter().find(|(k, _)| *k == (x, y)) {
            return id;
        }
        *next_id += 1;
        ids.push(((x, y), *next_id));
        *next_id
    };
    match (a, b) {
        _ if a == b => a,
        (T::Scalar(_), T::Scalar(_)) => T::Scalar(None),
        (T::Value(m, o), T::ValueOrNull(n, p, id)) | (T::ValueOrNull(n, p, id), T::Value(m, o))
            if m == n && o == p =>
        {
            T::ValueOrNull(m, o, fresh(id, u32::MAX))
        }
        (T::ValueOrNull(m, o, x), T::ValueOrNull(n, p, y)) if m == n && o == p => {
            T::ValueOrNull(m, o, fresh(x, y))
        }
        (T::Scalar(Some(0)), T::Value(m, o)) | (T::Value(m, o), T::Scalar(Some(0))) => {
            T::ValueOrNull(m, o, fresh(u32::MAX, u32::MAX - 1))
        }
        (T::Scalar(Some(0)), T::ValueOrNull(m, o, id))
        | (T::ValueOrNull(m, o, id), T::Scalar(Some(0))) => {
            T::ValueOrNull(m, o, fresh(id, u32::MAX - 2))
        }
        _ => T::Uninit,
    }
}

impl State {
    fn entry() -> State {
        let mut regs = [T::Uninit; 11];
        regs[1] = T::Ctx(0);
        regs[10] = T::Stack(0);
        State {
            regs,
            stack: [Slot::Bytes(0); (STACK / 8) as usize],
        }
    }

    fn join(&mut self, o: &State, next_id: &mut u32) {
        let mut ids = Vec::new();
        for i in 0..11 {
            self.regs[i] = join_t(self.regs[i], o.regs[i], &mut ids, next_id);
        }
        for i in 0..self.stack.len() {
            let written = |s: Slot| match s {
                Slot::Bytes(m) => m,
                Slot::Spill(T::Scalar(_)) => 0xff,
                Slot::Spill(_) => 0,
            };
            self.stack[i] = match (self.stack[i], o.stack[i]) {
                (a, b) if a == b => a,
                (Slot::Spill(a), Slot::Spill(b)) => match join_t(a, b, &mut ids, next_id) {
                    T::Uninit => Slot::Bytes(0),
                    t => Slot::Spill(t),
                },
                (a, b) => Slot::Bytes(written(a) & written(b)),
            };
        }
    }

    /// After a null check: the copies of value-or-null `id` are null (`Scalar(0)`) or not.
    fn refine(&mut self, id: u32, null: bool) {
        let f = |t: T| match t {
            T::ValueOrNull(m, o, i) if i == id => {
                if null {
                    T::Scalar(Some(0))
                } else {
                    T::Value(m, o)
                }
            }
            t => t,
        };
        for r in self.regs.iter_mut() {
            *r = f(*r);
        }
        for s in self.stack.iter_mut() {
            if let Slot::Spill(t) = s {
                *s = Slot::Spill(f(*t));
            }
        }
    }
}

#[derive(Clone, Copy)]
struct Insn {
    op: u8,
    dst: usize,
    src: usize,
    off: i16,
    imm: i32,
}

fn decode(b: &[u8; 8]) -> Insn {
    Insn {
        op: b[0],
        dst: (b[1] & 0x0f) as usize,
        src: (b[1] >> 4) as usize,
        off: i16::from_le_bytes([b[2], b[3]]),
        imm: i32::from_le_bytes([b[4], b[5], b[6], b[7]]),
    }
}

const ALU_NAMES: [&str; 14] = [
    "add", "sub", "mul", "div", "or", "and", "lsh", "rsh", "neg", "mod", "xor", "mov", "arsh",
    "end",
];
const JMP_NAMES: [&str; 14] = [
    "ja", "jeq", "jgt", "jge", "jset", "jne", "jsgt", "jsge", "call", "exit", "jlt", "jle", "jslt",
    "jsle",
];
const SIZE_NAMES: [&str; 4] = ["w", "h", "b", "dw"];

/// A short assembler rendering of one instruction, for messages.
pub fn describe(b: &[u8; 8]) -> String {
    let i = decode(b);
    let class = i.op & 7;
    let src = if i.op & 8 != 0 {
        format!("r{}", i.src)
    } else {
        i.imm.to_string()
    };
    let sz = SIZE_NAMES[((i.op >> 3) & 3) as usize];
    match class {
        0 if i.op == LD_DW_IMM => format!("lddw r{}, {}", i.dst, i.imm),
        1 => format!("ldx{sz} r{}, [r{}{:+}]", i.dst, i.src, i.off),
        2 => format!("st{sz} [r{}{:+}], {}", i.dst, i.off, i.imm),
        3 => format!("stx{sz} [r{}{:+}], r{}", i.dst, i.off, i.src),
        4 | 7 => {
            let n = ALU_NAMES.get((i.op >> 4) as usize).unwrap_or(&"alu?");
            let w = if class == 4 { "32" } else { "" };
            format!("{n}{w} r{}, {src}", i.dst)
        }
        5 | 6 => {
            let n = JMP_NAMES.get((i.op >> 4) as usize).unwrap_or(&"jmp?");
            match i.op {
                0x85 => format!("call {}", i.imm),
                0x95 => "exit".into(),
                0x05 => format!("ja {:+}", i.off),
                _ => format!(
                    "{n}{} r{}, {src}, {:+}",
                    if class == 6 { "32" } else { "" },
                    i.dst,
                    i.off
                ),
            }
        }
        _ => format!("opcode {:#04x}", i.op),
    }
}

/// What the verifier learned: the number of instructions that can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verified {
    pub reachable: usize,
}

struct V<'a> {
    insns: &'a [[u8; 8]],
    maps: &'a [MapDef],
    pc: usize,
}

impl V<'_> {
    fn fail<X>(&self, why: impl std::fmt::Display) -> Result<X> {
        refuse(format!(
            "instruction {} ({}): {why}",
            self.pc,
            describe(&self.insns[self.pc])
        ))
    }

    fn read(&self, st: &State, r: usize) -> Result<T> {
        match st.regs[r] {
            T::Uninit => self.fail(format!(
                "r{r} is read before it is set (or holds different kinds of value on different paths)"
            )),
            t => Ok(t),
        }
    }

    fn scalar(&self, st: &State, r: usize) -> Result<Option<u64>> {
        match self.read(st, r)? {
            T::Scalar(v) => Ok(v),
            _ => self.fail(format!("r{r} holds a pointer where a number is needed")),
        }
    }

    /// Check an access of `size` bytes at `off` from a pointer of type `t`; for a load
    /// returns the loaded type.
    fn access(&self, st: &mut State, t: T, off: i16, size: i64, store: Option<T>) -> Result<T> {
        if let Some(v) = store {
            if v.is_pointer() && !matches!(t, T::Stack(_)) {
                return self.fail(
                    "stores a pointer outside the stack (pointers may not leave the program)",
                );
            }
        }
        match t {
            T::Ctx(o) => {
                let a = o + off as i64;
                if a < 0 || a + size > CTX_SIZE as i64 {
                    return self.fail(format!(
                        "{} {size} bytes at offset {a} of the context, which is {CTX_SIZE} bytes",
                        if store.is_some() { "writes" } else { "reads" }
                    ));
                }
                if a % size != 0 {
                    return self.fail(format!("misaligned {size}-byte context access at offset {a}"));
                }
                if store.is_some() && !ctx::store_allowed(a as usize, size as usize) {
                    return self.fail(format!(
                        "writes context field {:?}, which is read-only (writable: flags, slba, nlb, status, cookie)",
                        ctx::field_at(a as usize)
                    ));
                }
                Ok(T::Scalar(None))
            }
            T::Stack(o) => {
                let a = o + off as i64;
                if a < -STACK || a + size > 0 {
                    return self.fail(format!("accesses the stack at r10{a:+} ({size} bytes), outside its {STACK} bytes"));
                }
                self.stack_access(st, a, size, store)
            }
            T::Value(m, o) => {
                let a = o + off as i64;
                let vs = self.maps[m as usize].value_size as i64;
                if a < 0 || a + size > vs {
                    return self.fail(format!(
                        "accesses {size} bytes at offset {a} of a value of map {:?}, which is {vs} bytes",
                        self.maps[m as usize].name
                    ));
                }
                Ok(T::Scalar(None))
            }
            T::ValueOrNull(m, ..) => self.fail(format!(
                "uses a value of map {:?} that may be NULL: check the result of nvmux_map_lookup() first",
                self.maps[m as usize].name
            )),
            T::Map(_) => self.fail("reads or writes a map's definition; use nvmux_map_lookup()"),
            T::Scalar(_) => self.fail("dereferences a number, not a pointer"),
            T::Uninit => self.fail("dereferences an unset register"),
        }
    }

    fn stack_access(&self, st: &mut State, a: i64, size: i64, store: Option<T>) -> Result<T> {
        let idx = ((a + STACK) / 8) as usize;
        let first = ((a + STACK) % 8) as u32;
        let last_idx = ((a + size - 1 + STACK) / 8) as usize;
        let aligned8 = size == 8 && first == 0;
        match store {
            Some(v) => {
                if v.is_pointer() && !aligned8 {
                    return self.fail("spills a pointer with a store that is not 8 bytes at an 8-byte aligned slot");
                }
                if aligned8 {
                    st.stack[idx] = Slot::Spill(v);
                } else {
                    for (k, slot) in st.stack.iter_mut().enumerate().take(last_idx + 1).skip(idx) {
                        let lo = if k == idx { first } else { 0 };
                        let hi = ((a + size + STACK) - (k as i64) * 8).min(8) as u32;
                        let bits = ((((1u16 << hi) - 1) & !((1u16 << lo) - 1)) & 0xff) as u8;
                        *slot = match *slot {
                            Slot::Bytes(m) => Slot::Bytes(m | bits),
                            Slot::Spill(T::Scalar(_)) => Slot::Bytes(0xff),
                            // The rest of a spilled pointer may not be read as data.
                            Slot::Spill(_) => Slot::Bytes(bits),
                        };
                    }
                }
                Ok(T::Uninit)
            }
            None => {
                if aligned8 {
                    if let Slot::Spill(t) = st.stack[idx] {
                        return Ok(t);
                    }
                }
                for k in idx..=last_idx {
                    let lo = if k == idx { first } else { 0 };
                    let hi = ((a + size + STACK) - (k as i64) * 8).min(8) as u32;
                    let need = ((((1u16 << hi) - 1) & !((1u16 << lo) - 1)) & 0xff) as u8;
                    match st.stack[k] {
                        Slot::Bytes(m) if m & need == need => {}
                        Slot::Spill(T::Scalar(_)) => {}
                        Slot::Spill(_) => {
                            return self.fail(format!(
                                "reads part of a pointer spilled at r10{:+}",
                                k as i64 * 8 - STACK
                            ))
                        }
                        Slot::Bytes(_) => {
                            return self.fail(format!(
                            "reads stack bytes at r10{a:+} ({size} bytes) that were never written"
                        ))
                        }
                    }
                }
                Ok(T::Scalar(None))
            }
        }
    }

    /// A helper argument of `len` readable bytes: stack (written) or map value.
    fn mem_arg(&self, st: &mut State, r: usize, len: u32, what: &str) -> Result<()> {
        match self.read(st, r)? {
            T::Stack(o) if o >= -STACK && o + len as i64 <= 0 => {
                // The helper copies these bytes out of the program (into a map, where map
                // readers and the operator's API see them): no byte may belong to a spilled
                // pointer, whatever the size and alignment (an aligned 8-byte read of a
                // spill is otherwise a legitimate "fill" of the pointer).
                let first = ((o + STACK) / 8) as usize;
                let last = ((o + len as i64 - 1 + STACK) / 8) as usize;
                for k in first..=last {
                    if let Slot::Spill(t) = st.stack[k] {
                        if t.is_pointer() {
                            return self.fail(format!(
                                "r{r} ({what}) covers a pointer spilled at r10{:+}: pointers may not be copied into a map (the address would leak to map readers)",
                                k as i64 * 8 - STACK
                            ));
                        }
                    }
                }
                self.stack_access(st, o, len as i64, None).map(|_| ())
            }
            t @ T::Value(..) => self.access(st, t, 0, len as i64, None).map(|_| ()),
            T::ValueOrNull(..) => self.fail(format!("r{r} ({what}) may be NULL: check it first")),
            _ => self.fail(format!(
                "r{r} must point to {len} bytes on the stack or in a map value ({what})"
            )),
        }
    }

    fn call(&self, st: &mut State, id: u32, next_id: &mut u32) -> Result<()> {
        let Some(&(_, name, args)) = HELPERS.iter().find(|h| h.0 == id) else {
            let known: Vec<String> = HELPERS
                .iter()
                .map(|h| format!("{} ({})", h.1, h.0))
                .collect();
            return self.fail(format!(
                "helper {id} does not exist; the helpers are {}",
                known.join(", ")
            ));
        };
        let mut map = None;
        for (k, a) in args.iter().enumerate() {
            let r = k + 1;
            match a {
                Arg::Map => match self.read(st, r)? {
                    T::Map(m) => map = Some(m as usize),
                    _ => {
                        return self
                            .fail(format!("{name}: r1 must be a map (&name of an NVMUX_MAP)"))
                    }
                },
                Arg::Key | Arg::Value => {
                    let m = &self.maps[map.unwrap_or(0)];
                    let (len, what) = if *a == Arg::Key {
                        (m.key_size, "key")
                    } else {
                        (m.value_size, "value")
                    };
                    self.mem_arg(st, r, len, what)?;
                }
                Arg::Scalar => {
                    self.scalar(st, r)?;
                }
                Arg::ValueU64 => match self.read(st, r)? {
                    t @ T::Value(_, o) if o % 8 == 0 => {
                        self.access(st, t, 0, 8, None)?;
                    }
                    _ => {
                        return self.fail(format!(
                            "{name}: r1 must point to an 8-byte aligned u64 in a map value"
                        ))
                    }
                },
            }
        }
        for r in 1..=5 {
            st.regs[r] = T::Uninit;
        }
        st.regs[0] = if id == HELPER_MAP_LOOKUP {
            *next_id += 1;
            T::ValueOrNull(map.unwrap_or(0) as u32, 0, *next_id)
        } else {
            T::Scalar(None)
        };
        Ok(())
    }

    fn alu(&self, st: &mut State, i: Insn) -> Result<()> {
        let is64 = i.op & 7 == 7;
        let op = i.op >> 4;
        if i.dst == 10 {
            return self.fail("writes r10, the read-only frame pointer");
        }
        if i.off != 0 {
            return self.fail("is a cpu v4 instruction (signed division or sign-extending move); compile with -mcpu=v3");
        }
        if op > 13 {
            return self.fail("unknown ALU operation");
        }
        if op == 13 {
            // end (byte swap to little or big endian) of 16, 32 or 64 bits
            if is64 {
                return self.fail("is a cpu v4 instruction (bswap); compile with -mcpu=v3");
            }
            if !matches!(i.imm, 16 | 32 | 64) {
                return self.fail("byte swap width must be 16, 32 or 64");
            }
            if i.op & 8 == 0 && i.imm != 64 {
                // rbpf's JIT compiles le16/le32 to nothing, without the truncation eBPF
                // defines: the JIT would compute another value than the program means.
                return self
                    .fail("le16/le32 are not supported by the JIT (use a mask: x & 0xffff)");
            }
            self.scalar(st, i.dst)?;
            st.regs[i.dst] = T::Scalar(None);
            return Ok(());
        }
        let src = if i.op & 8 != 0 {
            if i.src > 10 {
                return self.fail("bad source register");
            }
            if op == 8 {
                return self.fail("unknown ALU operation");
            }
            self.read(st, i.src)?
        } else {
            T::Scalar(Some(if is64 {
                i.imm as i64 as u64
            } else {
                i.imm as u32 as u64
            }))
        };
        if op == 11 && !is64 && i.op & 8 != 0 {
            // rbpf's JIT copies all 64 bits for mov32 between registers instead of
            // zero-extending the low 32: the program would see another value than the one
            // eBPF defines (and this verifier tracks).
            return self.fail("mov32 between registers (w1 = w2) is not supported by the JIT; compile with the default -mcpu (v1) or -mcpu=v2");
        }
        if op == 11 {
            // mov
            st.regs[i.dst] = if is64 {
                src
            } else if let T::Scalar(v) = src {
                T::Scalar(v.map(|v| v as u32 as u64))
            } else {
                return self.fail("truncates a pointer to 32 bits");
            };
            return Ok(());
        }
        let dst = if op == 8 {
            T::Scalar(self.scalar(st, i.dst)?)
        } else {
            self.read(st, i.dst)?
        };
        // Pointer arithmetic: add or subtract a known constant, 64-bit only.
        let ptr_add = |t: T, d: i64| -> Option<T> {
            match t {
                T::Ctx(o) => Some(T::Ctx(o.checked_add(d)?)),
                T::Stack(o) => Some(T::Stack(o.checked_add(d)?)),
                T::Value(m, o) => Some(T::Value(m, o.checked_add(d)?)),
                _ => None,
            }
        };
        let limit = |t: Option<T>| {
            t.filter(|t| matches!(t, T::Ctx(o) | T::Stack(o) | T::Value(_, o) if o.abs() < 1 << 20))
        };
        let result = match (dst, src) {
            (T::Scalar(a), T::Scalar(b)) => T::Scalar(eval(op, is64, a, b)),
            (p, T::Scalar(Some(k))) if p.is_pointer() && is64 && (op == 0 || op == 1) => {
                let d = if op == 0 { k as i64 } else { (k as i64).wrapping_neg() };
                match limit(ptr_add(p, d)) {
                    Some(t) => t,
                    None => return self.fail("pointer arithmetic on a map or a possibly-NULL value, or too far"),
                }
            }
            (T::Scalar(Some(k)), p) if p.is_pointer() && is64 && op == 0 => match limit(ptr_add(p, k as i64)) {
                Some(t) => t,
                None => return self.fail("pointer arithmetic on a map or a possibly-NULL value, or too far"),
            },
            (T::Ctx(_), T::Ctx(_)) | (T::Stack(_), T::Stack(_)) if is64 && op == 1 => T::Scalar(None),
            (p, q) if p.is_pointer() || q.is_pointer() => {
                return self.fail(
                    "arithmetic on a pointer other than adding a constant (a variable offset cannot be bounds-checked)",
                )
            }
            _ => T::Scalar(None),
        };
        st.regs[i.dst] = result;
        Ok(())
    }
}

/// Evaluate a scalar ALU operation when both operands are known. Known values matter only
/// as pointer offsets, so only 64-bit add and subtract are computed, the operations whose
/// machine code is beyond doubt: a constant the verifier believes must be the value the
/// JIT's code computes (fuzzing found two rbpf instructions where they differed; those
/// are refused above). Everything else gives "unknown", which no pointer may be offset by.
fn eval(op: u8, is64: bool, a: Option<u64>, b: Option<u64>) -> Option<u64> {
    let (a, b) = (a?, b?);
    match (is64, op) {
        (true, 0) => Some(a.wrapping_add(b)),
        (true, 1) => Some(a.wrapping_sub(b)),
        _ => None,
    }
}

/// Verify a program (map references as `elf::load` leaves them) against its maps.
pub fn verify(insns: &[[u8; 8]], maps: &[MapDef]) -> Result<Verified> {
    check_maps(maps)?;
    let n = insns.len();
    if n == 0 {
        return refuse("the program is empty");
    }
    if n > crate::elf::MAX_INSNS {
        return refuse(format!(
            "{n} instructions; at most {} are accepted",
            crate::elf::MAX_INSNS
        ));
    }
    // Second halves of ld_imm64: no jump may land there.
    let mut second = vec![false; n];
    let mut k = 0;
    while k < n {
        if insns[k][0] == LD_DW_IMM {
            if k + 1 >= n {
                return refuse(format!(
                    "instruction {k}: ld_imm64 is cut off at the end of the program"
                ));
            }
            second[k + 1] = true;
            k += 2;
        } else {
            k += 1;
        }
    }
    let mut v = V { insns, maps, pc: 0 };
    let order = topological_order(insns, &second, &mut v)?;
    let mut pending: Vec<Option<State>> = vec![None; n + 1];
    pending[0] = Some(State::entry());
    let mut next_id = 0u32;
    let mut reachable = 0;
    for pc in order {
        v.pc = pc;
        let Some(mut st) = pending[pc].take() else {
            continue; // unreachable
        };
        reachable += 1;
        let i = decode(&insns[pc]);
        if i.dst > 10 || i.src > 10 {
            return v.fail("bad register number");
        }
        let class = i.op & 7;
        // (fall through to pc + step, jump target with its state)
        let mut step = Some(1usize);
        let mut jump: Option<(usize, State)> = None;
        match class {
            0 => {
                if i.op != LD_DW_IMM {
                    return v.fail("legacy packet loads (ld_abs, ld_ind) are not supported");
                }
                let hi = decode(&insns[pc + 1]);
                if hi.op != 0 || hi.dst != 0 || hi.src != 0 || hi.off != 0 {
                    return v.fail("malformed ld_imm64 (bad second half)");
                }
                if i.dst == 10 {
                    return v.fail("writes r10, the read-only frame pointer");
                }
                st.regs[i.dst] = match i.src as u8 {
                    0 => T::Scalar(Some((i.imm as u32 as u64) | ((hi.imm as u32 as u64) << 32))),
                    PSEUDO_MAP if (i.imm as u32 as usize) < maps.len() && hi.imm == 0 => {
                        T::Map(i.imm as u32)
                    }
                    PSEUDO_MAP => return v.fail("refers to a map that does not exist"),
                    s => {
                        return v.fail(format!(
                            "ld_imm64 with source {s} (BTF or map-value loads) is not supported"
                        ))
                    }
                };
                step = Some(2);
            }
            1..=3 => {
                let mode = i.op & 0xe0;
                let size = [4i64, 2, 1, 8][((i.op >> 3) & 3) as usize];
                if class == 3 && mode == 0xc0 {
                    return v.fail("atomic instructions are not supported; use nvmux_atomic_add()");
                }
                if mode != 0x60 {
                    return v.fail("unsupported memory access mode (sign-extending loads need -mcpu=v3 or lower)");
                }
                if class == 1 {
                    if i.dst == 10 {
                        return v.fail("writes r10, the read-only frame pointer");
                    }
                    let base = v.read(&st, i.src)?;
                    let t = v.access(&mut st, base, i.off, size, None)?;
                    st.regs[i.dst] = t;
                } else {
                    let val = if class == 2 {
                        T::Scalar(Some(i.imm as i64 as u64))
                    } else {
                        v.read(&st, i.src)?
                    };
                    let base = v.read(&st, i.dst)?;
                    v.access(&mut st, base, i.off, size, Some(val))?;
                }
            }
            4 | 7 => v.alu(&mut st, i)?,
            5 | 6 => {
                let op = i.op >> 4;
                let is_reg = i.op & 8 != 0;
                match (class, op) {
                    (5, 8) => {
                        if is_reg || i.src != 0 || i.dst != 0 {
                            return v.fail(if i.src == 1 {
                                "calls another eBPF function: not supported; mark it `static __attribute__((always_inline))`"
                            } else {
                                "this kind of call is not supported (only helpers)"
                            });
                        }
                        v.call(&mut st, i.imm as u32, &mut next_id)?;
                    }
                    (5, 9) => {
                        if is_reg || i.src != 0 || i.dst != 0 {
                            return v.fail("malformed exit");
                        }
                        match st.regs[0] {
                            T::Scalar(_) => {}
                            T::Uninit => return v.fail("r0 (the route) is not set at exit"),
                            _ => {
                                return v
                                    .fail("returns a pointer; return a route (NVMUX_CHAIN, ...)")
                            }
                        }
                        step = None;
                    }
                    (_, 0..=7) | (_, 10..=13) => {
                        // In range and acyclic: checked by topological_order.
                        let target = (pc as i64 + 1 + i.off as i64) as usize;
                        if op == 0 {
                            step = None;
                            jump = Some((target, st.clone()));
                        } else {
                            let a = v.read(&st, i.dst)?;
                            let b = if is_reg {
                                v.read(&st, i.src)?
                            } else {
                                T::Scalar(Some(i.imm as i64 as u64))
                            };
                            let mut taken = st.clone();
                            match (a, b) {
                                (T::Scalar(_), T::Scalar(_)) => {}
                                (p, T::Scalar(Some(0))) if p.is_pointer() && !is_reg && class == 5 && (op == 1 || op == 5) => {
                                    if let T::ValueOrNull(_, _, id) = p {
                                        // jeq 0: taken when null; jne 0: taken when not null.
                                        taken.refine(id, op == 1);
                                        st.refine(id, op != 1);
                                    }
                                }
                                _ => return v.fail("compares a pointer (only `if (p)` / `if (!p)` null checks are allowed)"),
                            }
                            jump = Some((target, taken));
                        }
                    }
                    _ => return v.fail("unknown jump operation"),
                }
            }
            _ => return v.fail("unknown instruction class"),
        }
        if let Some((t, s)) = jump {
            match &mut pending[t] {
                Some(p) => p.join(&s, &mut next_id),
                slot => *slot = Some(s),
            }
        }
        if let Some(s) = step {
            match &mut pending[pc + s] {
                Some(p) => p.join(&st, &mut next_id),
                slot => *slot = Some(st),
            }
        }
    }
    Ok(Verified { reachable })
}

/// The instructions control can go to from `pc` (checked to lie in the program).
fn successors(insns: &[[u8; 8]], second: &[bool], v: &mut V<'_>, pc: usize) -> Result<Vec<usize>> {
    v.pc = pc;
    let n = insns.len();
    let i = decode(&insns[pc]);
    let class = i.op & 7;
    let op = i.op >> 4;
    let next = |k: usize| -> Result<usize> {
        if pc + k >= n {
            return v.fail("falls off the end of the program (the last instruction must be exit)");
        }
        Ok(pc + k)
    };
    if i.op == LD_DW_IMM {
        return Ok(vec![next(2)?]);
    }
    if class != 5 && class != 6 {
        return Ok(vec![next(1)?]);
    }
    match (class, op) {
        (5, 9) => Ok(Vec::new()),     // exit
        (5, 8) => Ok(vec![next(1)?]), // call
        (6, 0) => v.fail("32-bit unconditional jumps (gotol) are not supported"),
        (_, 0..=7) | (_, 10..=13) => {
            let t = pc as i64 + 1 + i.off as i64;
            if t < 0 || t as usize >= n || second[t as usize] {
                return v.fail(format!(
                    "jumps to instruction {t}, outside the program or into an ld_imm64"
                ));
            }
            let t = t as usize;
            if op == 0 {
                Ok(vec![t])
            } else {
                Ok(vec![next(1)?, t])
            }
        }
        _ => v.fail("unknown jump operation"),
    }
}

/// Reverse post-order of a depth-first search from instruction 0; refuses a cycle.
fn topological_order(insns: &[[u8; 8]], second: &[bool], v: &mut V<'_>) -> Result<Vec<usize>> {
    const WHITE: u8 = 0;
    const GREY: u8 = 1;
    const BLACK: u8 = 2;
    let n = insns.len();
    let mut color = vec![WHITE; n];
    let mut post = Vec::with_capacity(n);
    // (instruction, its successors, next successor to visit)
    let mut stack: Vec<(usize, Vec<usize>, usize)> = vec![(0, successors(insns, second, v, 0)?, 0)];
    color[0] = GREY;
    while let Some(top) = stack.last_mut() {
        let (pc, succ, k) = (top.0, &top.1, top.2);
        if k < succ.len() {
            let t = succ[k];
            top.2 += 1;
            match color[t] {
                WHITE => {
                    color[t] = GREY;
                    let s = successors(insns, second, v, t)?;
                    stack.push((t, s, 0));
                }
                GREY => {
                    v.pc = pc;
                    return v.fail(format!(
                        "jumps back to instruction {t}, closing a loop: loops are not allowed (a classifier must be bounded); unroll it"
                    ));
                }
                _ => {}
            }
        } else {
            color[pc] = BLACK;
            post.push(pc);
            stack.pop();
        }
    }
    if let Some(pc) = (0..n).find(|&i| color[i] == WHITE && !second[i]) {
        v.pc = pc;
        return v.fail("is unreachable (no path from the first instruction leads here)");
    }
    post.reverse();
    Ok(post)
}

/// Assemble one instruction (for tests).
#[cfg(test)]
pub(crate) fn ins(op: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let o = off.to_le_bytes();
    let m = imm.to_le_bytes();
    [op, dst | (src << 4), o[0], o[1], m[0], m[1], m[2], m[3]]
}

#[cfg(test)]
mod tests {
    use super::*;
    const EXIT: [u8; 8] = [0x95, 0, 0, 0, 0, 0, 0, 0];
    fn mov0() -> [u8; 8] {
        ins(0xb7, 0, 0, 0, 0)
    }
    fn map(value_size: u32) -> MapDef {
        MapDef {
            name: "m".into(),
            kind: 2,
            key_size: 4,
            value_size,
            max_entries: 4,
            flags: 0,
        }
    }
    fn err(p: &[[u8; 8]], maps: &[MapDef]) -> String {
        verify(p, maps).expect_err("should be refused").msg
    }

    #[test]
    fn accepts_simple_programs() {
        // r0 = 0; exit
        assert_eq!(
            verify(&[mov0(), EXIT], &[]).map(|v| v.reachable).ok(),
            Some(2)
        );
        // r2 = *(u64 *)(r1 + 16); *(u64 *)(r1 + 16) = r2 + 8; r0 = 0; exit
        let p = [
            ins(0x79, 2, 1, 16, 0),
            ins(0x07, 2, 0, 0, 8),
            ins(0x7b, 1, 2, 16, 0),
            mov0(),
            EXIT,
        ];
        verify(&p, &[]).expect("rewrite slba");
    }

    #[test]
    fn context_bounds_and_writable_fields() {
        let p = [ins(0x79, 2, 1, 64, 0), mov0(), EXIT];
        assert!(
            err(&p, &[]).contains("offset 64 of the context"),
            "{}",
            err(&p, &[])
        );
        let p = [ins(0x79, 2, 1, -8, 0), mov0(), EXIT];
        assert!(err(&p, &[]).contains("context"));
        // opcode (offset 8) is read-only
        let p = [ins(0x72, 1, 0, 8, 1), mov0(), EXIT];
        assert!(
            err(&p, &[]).contains("\"opcode\", which is read-only"),
            "{}",
            err(&p, &[])
        );
        // pointer arithmetic moves the window: r1 += 60; *(u64*)(r1+0) reads 60..68
        let p = [ins(0x07, 1, 0, 0, 60), ins(0x79, 2, 1, 0, 0), mov0(), EXIT];
        assert!(err(&p, &[]).contains("context"));
        // a variable offset is refused
        let p = [ins(0x61, 2, 1, 24, 0), ins(0x0f, 1, 2, 0, 0), mov0(), EXIT];
        assert!(err(&p, &[]).contains("variable offset"), "{}", err(&p, &[]));
    }

    #[test]
    fn loops_and_falling_off_are_refused() {
        let p = [mov0(), ins(0x05, 0, 0, -2, 0), EXIT];
        assert!(err(&p, &[]).contains("loops are not allowed"));
        let p = [mov0(), ins(0x05, 0, 0, -1, 0)];
        assert!(err(&p, &[]).contains("loops"));
        // A backward jump to a shared exit is not a loop (clang emits these).
        let p = [mov0(), ins(0x05, 0, 0, 1, 0), EXIT, ins(0x05, 0, 0, -2, 0)];
        verify(&p, &[]).expect("backward jump without a cycle");
        // A conditional loop: r2 = 5; loop: r2 -= 1; if r2 != 0 goto loop
        let p = [
            ins(0xb7, 2, 0, 0, 5),
            ins(0x17, 2, 0, 0, 1),
            ins(0x55, 2, 0, -2, 0),
            mov0(),
            EXIT,
        ];
        assert!(err(&p, &[]).contains("closing a loop"), "{}", err(&p, &[]));
        let p = [mov0()];
        assert!(err(&p, &[]).contains("falls off the end"));
        let p = [mov0(), ins(0x05, 0, 0, 5, 0), EXIT];
        assert!(err(&p, &[]).contains("outside the program"));
    }

    #[test]
    fn registers_stack_and_pointers() {
        // r0 unset at exit
        assert!(err(&[EXIT], &[]).contains("r0"));
        // read of r3 before it is set
        let p = [ins(0xbf, 0, 3, 0, 0), EXIT];
        assert!(err(&p, &[]).contains("r3 is read before"));
        // returning a pointer
        let p = [ins(0xbf, 0, 1, 0, 0), EXIT];
        assert!(err(&p, &[]).contains("returns a pointer"));
        // uninitialised stack read
        let p = [ins(0x79, 0, 10, -8, 0), EXIT];
        assert!(err(&p, &[]).contains("never written"));
        // written, then read back
        let p = [ins(0x7a, 10, 0, -8, 7), ins(0x79, 0, 10, -8, 0), EXIT];
        verify(&p, &[]).expect("stack round trip");
        // a half-written slot
        let p = [ins(0x62, 10, 0, -8, 7), ins(0x79, 0, 10, -8, 0), EXIT];
        assert!(err(&p, &[]).contains("never written"));
        // stack out of bounds
        let p = [ins(0x7a, 10, 0, -520, 7), mov0(), EXIT];
        assert!(err(&p, &[]).contains("outside its 512 bytes"));
        // leaking a pointer into the context cookie
        let p = [ins(0x7b, 1, 10, 48, 0), mov0(), EXIT];
        assert!(err(&p, &[]).contains("stores a pointer outside the stack"));
        // spilling ctx and reloading it keeps its type
        let p = [
            ins(0x7b, 10, 1, -8, 0),
            ins(0x79, 3, 10, -8, 0),
            ins(0x79, 0, 3, 16, 0),
            EXIT,
        ];
        verify(&p, &[]).expect("spill and fill");
        // reading a spilled pointer partially
        let p = [ins(0x7b, 10, 1, -8, 0), ins(0x61, 0, 10, -8, 0), EXIT];
        assert!(err(&p, &[]).contains("part of a pointer"));
        // writing r10
        let p = [ins(0xb7, 10, 0, 0, 0), mov0(), EXIT];
        assert!(err(&p, &[]).contains("r10"));
        // atomics
        let p = [
            ins(0x7a, 10, 0, -8, 0),
            ins(0xdb, 10, 0, -8, 0),
            mov0(),
            EXIT,
        ];
        assert!(err(&p, &[]).contains("atomic"));
        // Instructions rbpf's JIT gets wrong (found by fuzzing: the JIT and the
        // interpreter disagreed): mov32 between registers, le16/le32.
        let p = [mov0(), ins(0xbc, 0, 0, 0, 0), EXIT];
        assert!(err(&p, &[]).contains("mov32 between registers"));
        let p = [mov0(), ins(0xd4, 0, 0, 0, 16), EXIT];
        assert!(err(&p, &[]).contains("le16/le32"));
        verify(
            &[mov0(), ins(0xd4, 0, 0, 0, 64), ins(0xdc, 0, 0, 0, 16), EXIT],
            &[],
        )
        .expect("le64, be16");
    }

    /// r2 = r10 - 4 with a written key; r1 = map 0; call lookup.
    fn lookup() -> Vec<[u8; 8]> {
        vec![
            ins(0x62, 10, 0, -4, 0),
            ins(0xbf, 2, 10, 0, 0),
            ins(0x07, 2, 0, 0, -4),
            ins(LD_DW_IMM, 1, PSEUDO_MAP, 0, 0),
            [0; 8],
            ins(0x85, 0, 0, 0, 1),
        ]
    }

    /// Spill `src` at r10-8 (and a written key at r10-12); update map 0 with the value at
    /// r10-8 (`value_size` bytes).
    fn update_from_stack(src: u8, value_off: i16) -> Vec<[u8; 8]> {
        vec![
            ins(0x7b, 10, src, -8, 0), // *(u64 *)(r10 - 8) = src
            ins(0x7a, 10, 0, -16, 0),  // *(u64 *)(r10 - 16) = 0
            ins(0x62, 10, 0, -20, 0),  // *(u32 *)(r10 - 20) = 0 (the key)
            ins(0xbf, 2, 10, 0, 0),
            ins(0x07, 2, 0, 0, -20),
            ins(0xbf, 3, 10, 0, 0),
            ins(0x07, 3, 0, 0, value_off as i32),
            ins(0xb7, 4, 0, 0, 0),
            ins(LD_DW_IMM, 1, PSEUDO_MAP, 0, 0),
            [0; 8],
            ins(0x85, 0, 0, 0, HELPER_MAP_UPDATE as i32),
            mov0(),
            EXIT,
        ]
    }

    #[test]
    fn pointers_never_reach_a_map_value() {
        // An aligned 8-byte value that is a spilled pointer (ctx in r1, the frame pointer
        // r10): a plain "fill" for a load, but a leak for map_update.
        for src in [1u8, 10] {
            let e = err(&update_from_stack(src, -8), &[map(8)]);
            assert!(e.contains("pointers may not be copied into a map"), "{e}");
        }
        // A 16-byte value whose second half is the spill.
        let e = err(&update_from_stack(1, -16), &[map(16)]);
        assert!(e.contains("pointers may not be copied into a map"), "{e}");
        // The same program with a number in the slot is fine.
        let mut p = update_from_stack(1, -8);
        p.insert(0, ins(0xb7, 6, 0, 0, 42));
        p[1] = ins(0x7b, 10, 6, -8, 0);
        verify(&p, &[map(8)]).expect("a number is a fine map value");
        let mut p = update_from_stack(1, -16);
        p.insert(0, ins(0xb7, 6, 0, 0, 42));
        p[1] = ins(0x7b, 10, 6, -8, 0);
        verify(&p, &[map(16)]).expect("16 bytes of numbers");
        // A stack slot that held a pointer on one path only is unreadable after the join,
        // so it cannot reach a map either.
        let mut p = vec![
            ins(0x61, 6, 1, 24, 0), // r6 = ctx->nlb (unknown)
            ins(0x7a, 10, 0, -8, 1),
            ins(0x15, 6, 0, 1, 0), // if r6 == 0 skip the spill
            ins(0x7b, 10, 1, -8, 0),
        ];
        p.extend(update_from_stack(1, -8).split_off(1));
        let e = err(&p, &[map(8)]);
        assert!(e.contains("never written") || e.contains("pointer"), "{e}");
        // Storing a pointer through a map value pointer is refused, as is returning one.
        let mut p = lookup();
        p.extend([
            ins(0x15, 0, 0, 2, 0),
            ins(0x7b, 0, 10, 0, 0), // *(u64 *)(r0 + 0) = r10
            EXIT,
            mov0(),
            EXIT,
        ]);
        assert!(err(&p, &[map(8)]).contains("stores a pointer outside the stack"));
        let mut p = lookup();
        p.extend([ins(0x15, 0, 0, 1, 0), EXIT, mov0(), EXIT]);
        assert!(err(&p, &[map(8)]).contains("returns a pointer"));
        // A pointer reloaded from the stack is still a pointer at exit.
        let p = [ins(0x7b, 10, 1, -8, 0), ins(0x79, 0, 10, -8, 0), EXIT];
        assert!(err(&p, &[]).contains("returns a pointer"));
    }

    #[test]
    fn maps_need_a_null_check() {
        let maps = [map(16)];
        let mut p = lookup();
        p.extend([ins(0x79, 0, 0, 0, 0), EXIT]);
        assert!(err(&p, &maps).contains("may be NULL"));
        let mut p = lookup();
        // if r0 == 0 goto exit0; r0 = *(u64*)(r0+8); exit; exit0: r0 = 0; exit
        p.extend([
            ins(0x15, 0, 0, 2, 0),
            ins(0x79, 0, 0, 8, 0),
            EXIT,
            mov0(),
            EXIT,
        ]);
        verify(&p, &maps).expect("checked lookup");
        // past the value's end
        let mut p = lookup();
        p.extend([
            ins(0x15, 0, 0, 2, 0),
            ins(0x79, 0, 0, 16, 0),
            EXIT,
            mov0(),
            EXIT,
        ]);
        assert!(err(&p, &maps).contains("value of map"));
        // a copy checked through r6 refines r0 too
        let mut p = lookup();
        p.extend([
            ins(0xbf, 6, 0, 0, 0),
            ins(0x55, 6, 0, 2, 0), // if r6 != 0 goto +2
            mov0(),
            EXIT,
            ins(0x79, 0, 0, 0, 0),
            EXIT,
        ]);
        verify(&p, &maps).expect("alias refined");
        // key not written
        let mut p = lookup();
        p.remove(0);
        p.extend([mov0(), EXIT]);
        assert!(err(&p, &maps).contains("never written"));
        // unknown helper
        let p = [ins(0x85, 0, 0, 0, 99), mov0(), EXIT];
        assert!(err(&p, &maps).contains("helper 99 does not exist"));
        // bad map definition
        assert!(err(&[mov0(), EXIT], &[map(0)]).contains("value size 0"));
        let mut hash = map(8);
        hash.kind = 1;
        assert!(err(&[mov0(), EXIT], &[hash]).contains("type 1"));
    }
}
