//! Fuzz harnesses shared by `fuzz/` (cargo-fuzz) and the corpus-replay unit tests.
//!
//! * [`classifier_one`]: bytes are an ELF object (first byte even) or raw instructions
//!   with one map (first byte odd). Whatever the loader and verifier accept is run, on a
//!   few contexts, by the interpreter, whose run-time memory checks must never fire for a
//!   verified program, and by the JIT, which must give the same verdict and context.
//! * [`ext_ring_one`]: bytes are a ring's completion queue as a (broken or hostile)
//!   function leaves it; the daemon's reaper must complete only entries in flight, each
//!   once, and never panic.

use crate::ctx::Ctx;
use crate::elf::MapDef;
use crate::program::Program;

fn contexts() -> [Ctx; 3] {
    let base = Ctx {
        version: crate::ctx::CTX_VERSION,
        opcode: 2,
        nsid: 1,
        slba: 100,
        nlb: 8,
        disk_blocks: 1 << 20,
        block_size: 512,
        ..Ctx::default()
    };
    [
        base,
        Ctx {
            opcode: 1,
            slba: 0,
            event: 1,
            status: 0x182,
            cookie: u64::MAX,
            ..base
        },
        Ctx {
            opcode: 0,
            nlb: 0,
            slba: u64::MAX,
            hops: 3,
            queue: 7,
            ..base
        },
    ]
}

fn load(data: &[u8]) -> Option<Program> {
    let (&mode, rest) = data.split_first()?;
    let prog = if mode & 1 == 0 {
        Program::load(rest, None)
    } else {
        let (&vs, code) = rest.split_first()?;
        let insns: Vec<[u8; 8]> = code
            .chunks_exact(8)
            .map(|c| c.try_into().unwrap_or([0; 8]))
            .collect();
        let map = MapDef {
            name: "m".into(),
            kind: 2,
            key_size: 4,
            value_size: (vs as u32 % 64) + 1,
            max_entries: 4,
            flags: 0,
        };
        Program::from_insns(insns, vec![map], "fuzz".into())
    };
    prog.ok()
}

/// Load, verify and run `data` (see the module docs).
pub fn classifier_one(data: &[u8]) {
    // Two instances, so that the interpreter's and the JIT's runs see the same map state.
    let (Some(interp), Some(jit)) = (load(data), load(data)) else {
        return;
    };
    // Time and random numbers differ between two runs: only compare runs without them.
    use crate::verifier::{HELPER_KTIME_NS, HELPER_PRANDOM};
    let same = !interp.calls(HELPER_KTIME_NS) && !interp.calls(HELPER_PRANDOM);
    for c in contexts() {
        let (mut a, mut b) = (c, c);
        let ri = interp.run_interpreted(&mut a);
        let Ok(ri) = ri else {
            panic!("the interpreter stopped a verified program: {ri:?}");
        };
        let rj = jit.run(&mut b);
        if !same {
            continue;
        }
        assert_eq!(Some(ri), rj, "JIT and interpreter disagree on the verdict");
        assert_eq!(a, b, "JIT and interpreter disagree on the context");
        assert_eq!(
            (a.version, a.opcode, a.disk_blocks),
            (c.version, c.opcode, c.disk_blocks),
            "a read-only field changed"
        );
        for (m, n) in interp.maps().iter().zip(jit.maps()) {
            for k in 0..m.def.max_entries.min(16) {
                assert_eq!(
                    m.read(k).ok(),
                    n.read(k).ok(),
                    "JIT and interpreter disagree on map {:?}",
                    m.def.name
                );
            }
        }
    }
}

/// Reap a completion queue whose contents are `data` (see the module docs).
pub fn ext_ring_one(data: &[u8]) {
    use nvmux_extfn::proto::{hdr, Layout, RingView};
    let Some(layout) = Layout::new(8, 4096) else {
        return;
    };
    let mut mem = vec![0u64; layout.size / 8];
    // SAFETY: `mem` is layout.size bytes and outlives the view.
    let view = unsafe { RingView::new(mem.as_mut_ptr().cast(), layout) };
    // The first byte says which of the 8 entries are in flight; then the tail, then
    // the CQ entries as the function wrote them.
    let Some((&mask, rest)) = data.split_first() else {
        return;
    };
    let mut owner: Vec<u32> = (0..8u32)
        .map(|i| {
            if mask & (1 << i) != 0 {
                100 + i
            } else {
                crate::ext::FREE_ENTRY
            }
        })
        .collect();
    let mut outstanding = mask.count_ones() as usize;
    let tail = rest
        .get(..4)
        .map_or(0, |t| u32::from_le_bytes([t[0], t[1], t[2], t[3]]));
    let entries = rest.get(4..).unwrap_or(&[]);
    let cq = layout.cq_off;
    let bytes = {
        // SAFETY: the CQ area is depth * 16 bytes inside `mem`.
        unsafe { std::slice::from_raw_parts_mut(mem.as_mut_ptr().cast::<u8>().add(cq), 8 * 16) }
    };
    let n = entries.len().min(bytes.len());
    bytes[..n].copy_from_slice(&entries[..n]);
    view.store(hdr::CQ_TAIL, tail);
    let before: Vec<u32> = owner.clone();
    let mut head = 0u32;
    let mut out = Vec::new();
    let _ = crate::ext::reap_cq(&view, &mut owner, &mut head, &mut outstanding, &mut out);
    let mut seen = std::collections::HashSet::new();
    for (slot, id, _) in &out {
        assert!((*id as usize) < 8, "completion id out of range");
        assert_eq!(
            before[*id as usize], *slot,
            "completed an entry that was not in flight"
        );
        assert!(seen.insert(*id), "completed an entry twice");
    }
    assert_eq!(outstanding + out.len(), mask.count_ones() as usize);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn corpus_named(name: &str) -> Vec<(String, Vec<u8>)> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fuzz/corpus")
            .join(name);
        let mut v = Vec::new();
        if let Ok(rd) = std::fs::read_dir(&dir) {
            for e in rd.flatten() {
                if let Ok(b) = std::fs::read(e.path()) {
                    v.push((e.file_name().to_string_lossy().into_owned(), b));
                }
            }
        }
        v
    }

    fn corpus(name: &str) -> Vec<Vec<u8>> {
        corpus_named(name).into_iter().map(|(_, b)| b).collect()
    }

    /// The `seed-elf-*` seeds are the example classifiers, compiled by clang: each verifies.
    #[test]
    fn example_classifiers_verify() {
        let seeds: Vec<_> = corpus_named("classifier_load")
            .into_iter()
            .filter(|(n, _)| n.starts_with("seed-elf-"))
            .collect();
        assert!(seeds.len() >= 6, "example classifier seeds missing");
        for (n, b) in seeds {
            let p = Program::load(&b[1..], None).unwrap_or_else(|e| panic!("{n}: {}", e.msg));
            assert_eq!(p.info.section, "classifier", "{n}");
        }
    }

    /// `seed-refused-leak_pointer` is `crates/nvmux/tests/classifiers/bad_leak_pointer.c`
    /// compiled by clang: it hands a spilled context pointer to map_update as the value.
    #[test]
    fn pointer_leak_seed_is_refused() {
        let (n, b) = corpus_named("classifier_load")
            .into_iter()
            .find(|(n, _)| n == "seed-refused-leak_pointer")
            .expect("the pointer-leak seed is missing");
        let e = match Program::load(&b[1..], None) {
            Ok(_) => panic!("{n}: a pointer leak was accepted"),
            Err(e) => e.msg,
        };
        assert!(e.contains("pointers may not be copied into a map"), "{e}");
    }

    #[test]
    fn replay_corpus() {
        let c = corpus("classifier_load");
        assert!(!c.is_empty(), "the classifier_load corpus is missing");
        for d in c {
            classifier_one(&d);
        }
        let c = corpus("ext_ring");
        assert!(!c.is_empty(), "the ext_ring corpus is missing");
        for d in c {
            ext_ring_one(&d);
        }
    }

    #[test]
    fn random_inputs() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..3000 {
            let len = (next() % 200) as usize;
            let mut d: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if let Some(b) = d.first_mut() {
                *b |= 1;
            }
            classifier_one(&d);
            ext_ring_one(&d);
        }
    }
}
