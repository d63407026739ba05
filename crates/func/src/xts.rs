//! AES-XTS-256 (IEEE 1619-2007, NIST SP 800-38E) over whole sectors, with the tweak of
//! dm-crypt's `aes-xts-plain64`: the IV sector number as a 16-byte little-endian integer.
//! Sectors of 512 to 4096 bytes; the IV of consecutive sectors advances by `iv_step`
//! (dm-crypt with `sector_size=4096` counts IVs in 512-byte units, so 8 per sector,
//! unless `iv_large_sectors` is set, which counts whole sectors: 1).
//!
//! Built on the `aes` crate, which uses the CPU's AES instructions (AES-NI) when present
//! and processes several blocks in parallel in `encrypt_blocks`. All tweaks of a sector
//! are computed first, so each sector is one parallel pass.

use aes::cipher::generic_array::GenericArray;
use aes::cipher::{BlockDecrypt, BlockEncrypt, KeyInit};
use aes::Aes256;

/// Bytes of an XTS-AES-256 key: two AES-256 keys.
pub const KEY_BYTES: usize = 64;
/// Sector sizes handled: 512 to 4096 bytes.
const MAX_SECTOR: usize = 4096;
/// Blocks processed per parallel AES pass (tweaks computed first, then one pass).
const CHUNK: usize = 32;

type Block = GenericArray<u8, aes::cipher::consts::U16>;

pub struct Xts {
    data: Aes256,
    tweak: Aes256,
}

impl Xts {
    /// `key` is key1 (data) followed by key2 (tweak), as in dm-crypt and OpenSSL.
    pub fn new(key: &[u8; KEY_BYTES]) -> Self {
        Xts {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
        }
    }

    /// Encrypt `buf` (whole sectors of `sector` bytes) in place; the first sector is
    /// number `first`.
    pub fn encrypt(&self, buf: &mut [u8], sector: usize, first: u64) {
        self.run(buf, sector, first, 1, true)
    }

    /// Decrypt `buf` (whole sectors) in place.
    pub fn decrypt(&self, buf: &mut [u8], sector: usize, first: u64) {
        self.run(buf, sector, first, 1, false)
    }

    /// Encrypt whole sectors whose IVs are `first`, `first + iv_step`, ...
    pub fn encrypt_iv(&self, buf: &mut [u8], sector: usize, first: u64, iv_step: u64) {
        self.run(buf, sector, first, iv_step, true)
    }

    /// Decrypt whole sectors whose IVs are `first`, `first + iv_step`, ...
    pub fn decrypt_iv(&self, buf: &mut [u8], sector: usize, first: u64, iv_step: u64) {
        self.run(buf, sector, first, iv_step, false)
    }

    fn run(&self, buf: &mut [u8], sector: usize, first: u64, iv_step: u64, enc: bool) {
        assert!(
            sector.is_power_of_two() && (512..=MAX_SECTOR).contains(&sector),
            "XTS sector size"
        );
        assert_eq!(buf.len() % sector, 0, "XTS on whole sectors only");
        let mut tweaks = [0u128; CHUNK];
        // The first tweaks of up to 8 sectors are encrypted in one parallel AES pass.
        for (g, grp) in buf.chunks_mut(8 * sector).enumerate() {
            let ns = grp.len() / sector;
            let mut t0 = [Block::default(); 8];
            for (k, t) in t0.iter_mut().enumerate().take(ns) {
                let n = first.wrapping_add((g * 8 + k) as u64 * iv_step);
                *t = Block::from((n as u128).to_le_bytes());
            }
            self.tweak.encrypt_blocks(&mut t0[..ns]);
            for (s, t) in grp.chunks_exact_mut(sector).zip(t0) {
                self.sector(s, u128::from_le_bytes(t.into()), enc, &mut tweaks);
            }
        }
    }

    /// One sector whose encrypted tweak is `t`.
    fn sector(&self, s: &mut [u8], t: u128, enc: bool, tweaks: &mut [u128; CHUNK]) {
        // Eight independent chains (block j, j + 8, j + 16, ...), each stepping by
        // alpha^8, so the CPU computes them in parallel instead of one long chain.
        let mut lanes = [t; 8];
        for j in 1..8 {
            lanes[j] = mul_alpha(lanes[j - 1]);
        }
        for c in s.chunks_exact_mut(CHUNK * 16) {
            let n = c.len() / 16;
            for group in tweaks[..n].chunks_exact_mut(8) {
                for (tw, l) in group.iter_mut().zip(lanes.iter_mut()) {
                    *tw = *l;
                    *l = mul_alpha8(*l);
                }
            }
            xor_tweaks(c, &tweaks[..n]);
            // SAFETY: `Block` is a 16-byte array with alignment 1, and `c` is exactly `n`
            // * 16 bytes, so it can be viewed as `n` blocks.
            let blocks =
                unsafe { std::slice::from_raw_parts_mut(c.as_mut_ptr().cast::<Block>(), n) };
            if enc {
                self.data.encrypt_blocks(blocks);
            } else {
                self.data.decrypt_blocks(blocks);
            }
            xor_tweaks(c, &tweaks[..n]);
        }
    }
}

/// Multiply by alpha in GF(2^128), little-endian (IEEE 1619 5.2).
fn mul_alpha(t: u128) -> u128 {
    (t << 1) ^ ((t >> 127) * 0x87)
}

/// Multiply by alpha^8: shift by a byte and fold the byte shifted out back in with the
/// field polynomial (x^128 = x^7 + x^2 + x + 1); the fold has degree < 15, so it needs
/// no further reduction.
fn mul_alpha8(t: u128) -> u128 {
    let top = t >> 120;
    (t << 8) ^ (top << 7) ^ (top << 2) ^ (top << 1) ^ top
}

fn xor_tweaks(s: &mut [u8], tweaks: &[u128]) {
    let p = s.as_mut_ptr().cast::<u128>();
    for (k, t) in tweaks.iter().enumerate().take(s.len() / 16) {
        // SAFETY: block `k` lies inside `s` (k < len / 16); unaligned access is used
        // because guest buffers have no alignment guarantee. The tweak is little-endian,
        // as is the host (x86-64; other hosts convert).
        unsafe {
            let v = p.add(k).read_unaligned();
            p.add(k).write_unaligned(v ^ t.to_le());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        let s: String = s.split_whitespace().collect();
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// IEEE 1619-2007 Annex B, vector 10: XTS-AES-256, data unit 0xff, 512 bytes.
    #[test]
    fn ieee1619_vector_10() {
        let mut key = [0u8; KEY_BYTES];
        key.copy_from_slice(&hex(
            "2718281828459045235360287471352662497757247093699959574966967627
             3141592653589793238462643383279502884197169399375105820974944592",
        ));
        let pt: Vec<u8> = (0..512).map(|i| i as u8).collect();
        let ct = hex(
            "1c3b3a102f770386e4836c99e370cf9bea00803f5e482357a4ae12d414a3e63b
             5d31e276f8fe4a8d66b317f9ac683f44680a86ac35adfc3345befecb4bb188fd
             5776926c49a3095eb108fd1098baec70aaa66999a72a82f27d848b21d4a741b0
             c5cd4d5fff9dac89aeba122961d03a757123e9870f8acf1000020887891429ca
             2a3e7a7d7df7b10355165c8b9a6d0a7de8b062c4500dc4cd120c0f7418dae3d0
             b5781c34803fa75421c790dfe1de1834f280d7667b327f6c8cd7557e12ac3a0f
             93ec05c52e0493ef31a12d3d9260f79a289d6a379bc70c50841473d1a8cc81ec
             583e9645e07b8d9670655ba5bbcfecc6dc3966380ad8fecb17b6ba02469a020a
             84e18e8f84252070c13e9f1f289be54fbc481457778f616015e1327a02b140f1
             505eb309326d68378f8374595c849d84f4c333ec4423885143cb47bd71c5edae
             9be69a2ffeceb1bec9de244fbe15992b11b77c040f12bd8f6a975a44a0f90c29
             a9abc3d4d893927284c58754cce294529f8614dcd2aba991925fedc4ae74ffac
             6e333b93eb4aff0479da9a410e4450e0dd7ae4c6e2910900575da401fc07059f
             645e8b7e9bfdef33943054ff84011493c27b3429eaedb4ed5376441a77ed4385
             1ad77f16f541dfd269d50d6a5f14fb0aab1cbb4c1550be97f7ab4066193c4caa
             773dad38014bd2092fa755c824bb5e54c4f36ffda9fcea70b9c6e693e148c151",
        );
        let x = Xts::new(&key);
        let mut buf = pt.clone();
        x.encrypt(&mut buf, 512, 0xff);
        assert_eq!(buf, ct);
        x.decrypt(&mut buf, 512, 0xff);
        assert_eq!(buf, pt);
    }

    #[test]
    fn alpha8_is_eight_alpha_steps() {
        for t in [
            1u128,
            0x87,
            1 << 127,
            u128::MAX,
            0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        ] {
            let mut u = t;
            for _ in 0..8 {
                u = mul_alpha(u);
            }
            assert_eq!(mul_alpha8(t), u, "{t:x}");
        }
    }

    /// A multi-sector call equals one call per sector with consecutive numbers.
    #[test]
    fn sectors_are_numbered_consecutively() {
        let key = [7u8; KEY_BYTES];
        let x = Xts::new(&key);
        let mut a: Vec<u8> = (0..2048).map(|i| (i * 31) as u8).collect();
        let mut b = a.clone();
        x.encrypt(&mut a, 512, 1000);
        for (i, s) in b.chunks_mut(512).enumerate() {
            x.encrypt(s, 512, 1000 + i as u64);
        }
        assert_eq!(a, b);
    }

    /// 4096-byte sectors with IVs in 512-byte units (dm-crypt `sector_size:4096` without
    /// `iv_large_sectors`): sector i of a 4096-byte area has IV first + 8i, and equals a
    /// one-sector call with that IV; with step 1 (iv_large_sectors) IV first + i.
    #[test]
    fn large_sectors_step_their_ivs() {
        let x = Xts::new(&[9u8; KEY_BYTES]);
        let plain: Vec<u8> = (0..3 * 4096).map(|i| (i * 13) as u8).collect();
        for step in [8u64, 1] {
            let mut a = plain.clone();
            x.encrypt_iv(&mut a, 4096, 80, step);
            for (i, s) in a.chunks(4096).enumerate() {
                let mut b = plain[i * 4096..(i + 1) * 4096].to_vec();
                x.encrypt(&mut b, 4096, 80 + i as u64 * step);
                assert_eq!(s, &b[..], "step {step} sector {i}");
            }
            // One 4096-byte sector is not eight 512-byte ones.
            let mut c = plain[..4096].to_vec();
            x.encrypt(&mut c, 512, 80);
            assert_ne!(c, a[..4096]);
            x.decrypt_iv(&mut a, 4096, 80, step);
            assert_eq!(a, plain);
        }
    }
}
