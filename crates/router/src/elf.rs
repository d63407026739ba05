//! A small reader for the ELF objects `clang -target bpf -c` writes: one program section,
//! the `maps` section of `struct nvmux_map_def`s, and the relocations that point the
//! program's `ld_imm64` instructions at those maps.
//!
//! Every offset and size in the file is checked before use; anything it does not
//! understand is refused with a reason, never guessed at. It is fuzzed
//! (`fuzz/fuzz_targets/classifier_load.rs`).

use crate::{refuse, Result};

/// Largest object accepted.
pub const MAX_OBJECT_BYTES: usize = 16 << 20;
/// Most instructions in a program (each `ld_imm64` counts two).
pub const MAX_INSNS: usize = 4096;
/// Most maps in an object.
pub const MAX_MAPS: usize = 64;

const EM_BPF: u16 = 247;
const ET_REL: u16 = 1;
const SHT_SYMTAB: u32 = 2;
const SHT_REL: u32 = 9;
const SHT_NOBITS: u32 = 8;
const SHF_EXECINSTR: u64 = 4;
const R_BPF_64_64: u32 = 1;
const R_BPF_64_32: u32 = 10;
/// `ld_imm64`: the only instruction a map relocation may patch.
pub const LD_DW_IMM: u8 = 0x18;
/// `src_reg` of an `ld_imm64` that loads a map (as `BPF_PSEUDO_MAP_FD` in Linux); `imm`
/// is then the map's index in [`Object::maps`].
pub const PSEUDO_MAP: u8 = 1;

/// A map as the object defines it (`struct nvmux_map_def`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapDef {
    pub name: String,
    pub kind: u32,
    pub key_size: u32,
    pub value_size: u32,
    pub max_entries: u32,
    pub flags: u32,
}

/// The program to load: its instructions, with map references patched to
/// `src_reg = PSEUDO_MAP, imm = map index`, and the maps.
#[derive(Clone, Debug)]
pub struct Object {
    pub section: String,
    pub insns: Vec<[u8; 8]>,
    pub maps: Vec<MapDef>,
}

struct Section<'a> {
    name: &'a str,
    kind: u32,
    flags: u64,
    data: &'a [u8],
    link: u32,
    info: u32,
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}
fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
}
fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

/// A NUL-terminated name at `off` in a string table.
fn name_at(strtab: &[u8], off: u32) -> Option<&str> {
    let rest = strtab.get(off as usize..)?;
    let end = rest.iter().position(|&c| c == 0)?;
    std::str::from_utf8(&rest[..end]).ok()
}

fn machine_name(m: u16) -> String {
    match m {
        3 => "x86 (3)".into(),
        62 => "x86-64 (62)".into(),
        183 => "AArch64 (183)".into(),
        243 => "RISC-V (243)".into(),
        m => m.to_string(),
    }
}

fn sections(b: &[u8]) -> Result<Vec<Section<'_>>> {
    if b.len() < 64 || &b[..4] != b"\x7fELF" {
        return refuse("not an ELF object (no ELF magic); build it with `clang -O2 -target bpf -c prog.c -o prog.o`");
    }
    if b[4] != 2 || b[5] != 1 {
        return refuse("not a 64-bit little-endian ELF object, as `clang -target bpf` writes");
    }
    let machine = u16_at(b, 18).unwrap_or(0);
    if machine != EM_BPF {
        return refuse(format!(
            "not an eBPF object: its ELF machine is {}, not BPF ({EM_BPF}); build it with `clang -target bpf`",
            machine_name(machine)
        ));
    }
    if b.len() > MAX_OBJECT_BYTES {
        return refuse(format!(
            "the object is {} bytes; at most {MAX_OBJECT_BYTES} are accepted",
            b.len()
        ));
    }
    if u16_at(b, 16) != Some(ET_REL) {
        return refuse("not a relocatable object (`clang -c` output is expected)");
    }
    let bad = || {
        crate::Error::new(
            nvmux_core::ErrorKind::InvalidArgument,
            "damaged ELF object: section headers lie outside the file",
        )
    };
    let shoff = u64_at(b, 40).ok_or_else(bad)? as usize;
    let shentsize = u16_at(b, 58).ok_or_else(bad)? as usize;
    let shnum = u16_at(b, 60).ok_or_else(bad)? as usize;
    let shstrndx = u16_at(b, 62).ok_or_else(bad)? as usize;
    if shentsize != 64 || shnum == 0 || shstrndx >= shnum {
        return refuse("damaged ELF object: bad section header table");
    }
    let table_end = shnum
        .checked_mul(64)
        .and_then(|n| n.checked_add(shoff))
        .ok_or_else(bad)?;
    if table_end > b.len() {
        return Err(bad());
    }
    let mut raw = Vec::with_capacity(shnum);
    for i in 0..shnum {
        let h = &b[shoff + i * 64..shoff + i * 64 + 64];
        let (name, kind) = (u32_at(h, 0).ok_or_else(bad)?, u32_at(h, 4).ok_or_else(bad)?);
        let flags = u64_at(h, 8).ok_or_else(bad)?;
        let (off, size) = (
            u64_at(h, 24).ok_or_else(bad)?,
            u64_at(h, 32).ok_or_else(bad)?,
        );
        let (link, info) = (
            u32_at(h, 40).ok_or_else(bad)?,
            u32_at(h, 44).ok_or_else(bad)?,
        );
        let data: &[u8] = if kind == SHT_NOBITS || i == 0 {
            &[]
        } else {
            let end = off.checked_add(size).ok_or_else(bad)?;
            b.get(off as usize..end as usize).ok_or_else(|| {
                crate::Error::new(
                    nvmux_core::ErrorKind::InvalidArgument,
                    format!("damaged ELF object: section {i} lies outside the file"),
                )
            })?
        };
        raw.push((name, kind, flags, data, link, info));
    }
    let shstr = raw[shstrndx].3;
    raw.into_iter()
        .map(|(name, kind, flags, data, link, info)| {
            Ok(Section {
                name: name_at(shstr, name).ok_or_else(|| {
                    crate::Error::new(
                        nvmux_core::ErrorKind::InvalidArgument,
                        "damaged ELF object: a section name lies outside the string table",
                    )
                })?,
                kind,
                flags,
                data,
                link,
                info,
            })
        })
        .collect()
}

struct Symbol<'a> {
    name: &'a str,
    shndx: u16,
    value: u64,
}

fn symbols<'a>(secs: &[Section<'a>]) -> Result<Vec<Symbol<'a>>> {
    let Some(st) = secs.iter().find(|s| s.kind == SHT_SYMTAB) else {
        return Ok(Vec::new());
    };
    let strtab = secs.get(st.link as usize).map(|s| s.data).ok_or_else(|| {
        crate::Error::new(
            nvmux_core::ErrorKind::InvalidArgument,
            "damaged ELF object: the symbol table has no string table",
        )
    })?;
    if st.data.len() % 24 != 0 {
        return refuse("damaged ELF object: the symbol table's size is not a multiple of 24");
    }
    Ok(st
        .data
        .chunks_exact(24)
        .map(|e| Symbol {
            name: name_at(strtab, u32_at(e, 0).unwrap_or(0)).unwrap_or(""),
            shndx: u16_at(e, 6).unwrap_or(0),
            value: u64_at(e, 8).unwrap_or(0),
        })
        .collect())
}

/// Read `bytes` and extract the program in `section` (or the object's only program).
pub fn load(bytes: &[u8], section: Option<&str>) -> Result<Object> {
    let secs = sections(bytes)?;
    let programs: Vec<usize> = (0..secs.len())
        .filter(|&i| secs[i].flags & SHF_EXECINSTR != 0 && !secs[i].data.is_empty())
        .collect();
    let names = || {
        programs
            .iter()
            .map(|&i| secs[i].name)
            .collect::<Vec<_>>()
            .join(", ")
    };
    let pi = match section {
        Some(want) => match secs.iter().position(|s| s.name == want) {
            Some(i) if programs.contains(&i) => i,
            Some(_) => {
                return refuse(format!(
                    "section {want:?} holds no program (programs: {})",
                    names()
                ))
            }
            None if programs.is_empty() => {
                return refuse(format!(
                    "there is no section {want:?}, and the object holds no program"
                ))
            }
            None => {
                return refuse(format!(
                    "there is no section {want:?} (programs: {})",
                    names()
                ))
            }
        },
        None => match programs.as_slice() {
            [one] => *one,
            [] => return refuse("the object holds no program (no executable section with code)"),
            _ => {
                return refuse(format!(
                    "the object holds several programs ({}); pick one with --section",
                    names()
                ))
            }
        },
    };
    let prog = &secs[pi];
    if prog.data.len() % 8 != 0 {
        return refuse(format!(
            "section {:?}: its size ({}) is not a whole number of instructions",
            prog.name,
            prog.data.len()
        ));
    }
    if prog.data.len() / 8 > MAX_INSNS {
        return refuse(format!(
            "section {:?} holds {} instructions; at most {MAX_INSNS} are accepted",
            prog.name,
            prog.data.len() / 8
        ));
    }
    let mut insns: Vec<[u8; 8]> = prog
        .data
        .chunks_exact(8)
        .map(|c| c.try_into().unwrap_or([0; 8]))
        .collect();
    let syms = symbols(&secs)?;
    if secs.iter().any(|s| s.name == ".maps") {
        return refuse("BTF-defined maps (section .maps) are not supported: define maps with NVMUX_MAP() from nvmux_classifier.h (section \"maps\")");
    }
    // Maps: every symbol in the `maps` section, in the order of their offsets.
    let mut maps = Vec::new();
    let mut map_syms: Vec<(u64, &str)> = Vec::new();
    if let Some(mi) = secs.iter().position(|s| s.name == "maps") {
        let data = secs[mi].data;
        map_syms = syms
            .iter()
            .filter(|s| s.shndx as usize == mi && !s.name.is_empty())
            .map(|s| (s.value, s.name))
            .collect();
        map_syms.sort();
        map_syms.dedup_by_key(|s| s.0);
        if map_syms.len() > MAX_MAPS {
            return refuse(format!(
                "the object defines {} maps; at most {MAX_MAPS} are accepted",
                map_syms.len()
            ));
        }
        for &(off, name) in &map_syms {
            let off = off as usize;
            let field = |i: usize| u32_at(data, off.checked_add(i * 4)?);
            let (Some(kind), Some(key_size), Some(value_size), Some(max_entries)) =
                (field(0), field(1), field(2), field(3))
            else {
                return refuse(format!(
                    "map {name:?}: its definition lies outside the maps section"
                ));
            };
            maps.push(MapDef {
                name: name.to_string(),
                kind,
                key_size,
                value_size,
                max_entries,
                flags: field(4).unwrap_or(0),
            });
        }
    }
    // Relocations of the program section.
    for rs in secs
        .iter()
        .filter(|s| s.kind == SHT_REL && s.info as usize == pi)
    {
        if rs.data.len() % 16 != 0 {
            return refuse(format!(
                "damaged ELF object: relocation section {:?} has a bad size",
                rs.name
            ));
        }
        for r in rs.data.chunks_exact(16) {
            let off = u64_at(r, 0).unwrap_or(u64::MAX);
            let info = u64_at(r, 8).unwrap_or(0);
            let (sym, kind) = ((info >> 32) as usize, info as u32);
            let at = if off.is_multiple_of(8) {
                (off / 8) as usize
            } else {
                usize::MAX
            };
            let Some(insn) = insns.get_mut(at) else {
                return refuse(format!(
                    "damaged ELF object: a relocation at byte {off} lies outside the program"
                ));
            };
            let target = syms.get(sym).ok_or_else(|| {
                crate::Error::new(
                    nvmux_core::ErrorKind::InvalidArgument,
                    "damaged ELF object: a relocation names a symbol that does not exist",
                )
            })?;
            let target_sec = secs.get(target.shndx as usize).map_or("", |s| s.name);
            if kind == R_BPF_64_32 {
                return refuse(format!(
                    "instruction {at} calls function {:?}: calls between eBPF functions are not supported; mark helpers `static __attribute__((always_inline))`",
                    target.name
                ));
            }
            if kind != R_BPF_64_64 || insn[0] != LD_DW_IMM {
                return refuse(format!(
                    "instruction {at}: relocation type {kind} against {:?} is not supported",
                    target.name
                ));
            }
            if target_sec != "maps" {
                return refuse(format!(
                    "instruction {at} uses {:?} in section {target_sec:?}: global variables are not supported; keep state in a map",
                    target.name
                ));
            }
            let Some(idx) = map_syms.iter().position(|&(o, _)| o == target.value) else {
                return refuse(format!(
                    "instruction {at} refers to map data that is not the start of a map"
                ));
            };
            insn[1] = (insn[1] & 0x0f) | (PSEUDO_MAP << 4);
            insn[4..8].copy_from_slice(&(idx as u32).to_le_bytes());
        }
    }
    Ok(Object {
        section: prog.name.to_string(),
        insns,
        maps,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_what_is_not_an_ebpf_object() {
        let e = load(
            b"hello world, this is not an object at all, but it is long enough to be one.",
            None,
        )
        .unwrap_err();
        assert!(e.msg.contains("not an ELF object"), "{}", e.msg);
        // An x86-64 ELF header.
        let mut x = vec![0u8; 64];
        x[..4].copy_from_slice(b"\x7fELF");
        x[4] = 2;
        x[5] = 1;
        x[16] = 1;
        x[18] = 62;
        let e = load(&x, None).unwrap_err();
        assert!(e.msg.contains("x86-64"), "{}", e.msg);
        // BPF, but the section table points past the end.
        x[18] = 247;
        x[40] = 0xff;
        x[58] = 64;
        x[60] = 3;
        assert!(load(&x, None).is_err());
        assert!(load(&[], None).is_err());
    }
}
