//! AES-XTS-256 (IEEE 1619-2007, NIST SP 800-38E) over whole sectors, with the tweak of
//! dm-crypt's `aes-xts-plain64`: the IV sector number as a 16-byte little-endian integer.
//! Sectors of 512 to 4096 bytes; the IV of consecutive sectors advances by `iv_step`
//! (dm-crypt with `sector_size=4096` counts IVs in 512-byte units, so 8 per sector,
//! unless `iv_large_sectors` is set, which counts whole sectors: 1).
//!
//! Two kernels give the same bytes:
//! * on x86-64 with AES-NI (checked at run time), a fused kernel on the AES instructions
//!   (`ni` below): the round keys are loaded once per call, eight blocks are in flight,
//!   the tweaks are stepped in vector registers and the XTS whitening is folded into the
//!   first and last round keys, so a 4 KiB block costs AES rounds and little else;
//! * elsewhere, the portable one over the `aes` crate (which has its own AES-NI backend
//!   but is called in runs of 32 blocks, reloading its round keys each time): all tweaks
//!   of a run are computed first, then one parallel `encrypt_blocks` pass.

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
    /// The AES-NI kernel's round keys, when the CPU has AES-NI.
    #[cfg(target_arch = "x86_64")]
    ni: Option<ni::Keys>,
}

impl Xts {
    /// `key` is key1 (data) followed by key2 (tweak), as in dm-crypt and OpenSSL. Uses
    /// the AES-NI kernel when the CPU has AES-NI.
    pub fn new(key: &[u8; KEY_BYTES]) -> Self {
        let mut x = Self::portable(key);
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("aes") {
            // SAFETY: the CPU has AES-NI (checked just above); SSE2 is part of x86-64.
            x.ni = Some(unsafe { ni::Keys::new(key) });
        }
        x
    }

    /// The portable kernel only (on the `aes` crate), whatever the CPU has: for
    /// comparisons in tests and benchmarks.
    pub fn portable(key: &[u8; KEY_BYTES]) -> Self {
        Xts {
            data: Aes256::new(GenericArray::from_slice(&key[..32])),
            tweak: Aes256::new(GenericArray::from_slice(&key[32..])),
            #[cfg(target_arch = "x86_64")]
            ni: None,
        }
    }

    /// Which kernel this instance runs: `"aes-ni"` or `"portable"`.
    pub fn kernel(&self) -> &'static str {
        #[cfg(target_arch = "x86_64")]
        if self.ni.is_some() {
            return "aes-ni";
        }
        "portable"
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

    /// Encrypt `dst.len()` bytes (whole sectors) read from `src` into `dst`, IVs as in
    /// [`Xts::encrypt_iv`]: one pass over the source, which is usually guest memory
    /// another core has just written (a copy first and an in-place pass after would
    /// read it twice).
    ///
    /// # Safety
    /// `src` must be readable for `dst.len()` bytes. It may be memory another process
    /// writes concurrently (the ciphertext is then of some mix of its contents) but must
    /// not overlap `dst`.
    pub unsafe fn encrypt_iv_from(
        &self,
        src: *const u8,
        dst: &mut [u8],
        sector: usize,
        first: u64,
        iv_step: u64,
    ) {
        check(dst, sector);
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = &self.ni {
            // SAFETY: `ni` is only set when the CPU has AES-NI (see `new`); `dst` is
            // whole sectors of 512..=4096 bytes (checked above) and the caller
            // guarantees `src` is readable for as many bytes.
            unsafe { ni::xts::<true>(k, src, dst.as_mut_ptr(), dst.len(), sector, first, iv_step) };
            return;
        }
        // SAFETY: the caller guarantees `src` is readable for `dst.len()` bytes and does
        // not overlap `dst`.
        unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) };
        self.run(dst, sector, first, iv_step, true)
    }

    fn run(&self, buf: &mut [u8], sector: usize, first: u64, iv_step: u64, enc: bool) {
        check(buf, sector);
        #[cfg(target_arch = "x86_64")]
        if let Some(k) = &self.ni {
            let (p, n) = (buf.as_mut_ptr(), buf.len());
            // SAFETY: `ni` is only set when the CPU has AES-NI (see `new`); `buf` is
            // whole sectors of 512..=4096 bytes (checked above), which is what the
            // kernel requires; in place, source and destination are the same bytes.
            unsafe {
                if enc {
                    ni::xts::<true>(k, p, p, n, sector, first, iv_step)
                } else {
                    ni::xts::<false>(k, p, p, n, sector, first, iv_step)
                }
            }
            return;
        }
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

/// The sector size is a power of two in 512..=4096 and `buf` whole sectors: the callers
/// (crypt.rs) check their layout at creation, so a failure is a bug, not peer input.
fn check(buf: &[u8], sector: usize) {
    assert!(
        sector.is_power_of_two() && (512..=MAX_SECTOR).contains(&sector),
        "XTS sector size"
    );
    assert_eq!(buf.len() % sector, 0, "XTS on whole sectors only");
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

/// The fused AES-NI kernel. Round keys are kept as `u128` (wiped on drop) and loaded
/// into vector registers once per call.
#[cfg(target_arch = "x86_64")]
mod ni {
    use core::arch::x86_64::*;
    use zeroize::Zeroize;

    /// AES-256 has 14 rounds: 15 round keys.
    const ROUNDS: usize = 14;

    pub struct Keys {
        /// key1's encryption round keys.
        enc: [u128; ROUNDS + 1],
        /// key1's decryption round keys (equivalent inverse cipher: reversed, with
        /// InvMixColumns applied to the middle ones).
        dec: [u128; ROUNDS + 1],
        /// key2's encryption round keys (the tweak is always encrypted).
        tweak: [u128; ROUNDS + 1],
    }

    impl Drop for Keys {
        fn drop(&mut self) {
            self.enc.zeroize();
            self.dec.zeroize();
            self.tweak.zeroize();
        }
    }

    impl Keys {
        /// # Safety
        /// The CPU must have AES-NI.
        #[target_feature(enable = "aes")]
        pub unsafe fn new(key: &[u8; super::KEY_BYTES]) -> Keys {
            let mut k = Keys {
                enc: [0; ROUNDS + 1],
                dec: [0; ROUNDS + 1],
                tweak: [0; ROUNDS + 1],
            };
            let mut k1 = [0u8; 32];
            k1.copy_from_slice(&key[..32]);
            let mut k2 = [0u8; 32];
            k2.copy_from_slice(&key[32..]);
            expand(&k1, &mut k.enc);
            expand(&k2, &mut k.tweak);
            k1.zeroize();
            k2.zeroize();
            k.dec[0] = k.enc[ROUNDS];
            k.dec[ROUNDS] = k.enc[0];
            for i in 1..ROUNDS {
                k.dec[i] = store(_mm_aesimc_si128(load(k.enc[ROUNDS - i])));
            }
            k
        }
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn load(v: u128) -> __m128i {
        // The round keys are little-endian bytes in a u128, as is the host.
        _mm_set_epi64x((v >> 64) as i64, v as i64)
    }

    #[inline]
    #[target_feature(enable = "sse2")]
    fn store(v: __m128i) -> u128 {
        let lo = _mm_cvtsi128_si64(v) as u64;
        let hi = _mm_cvtsi128_si64(_mm_unpackhi_epi64(v, v)) as u64;
        (hi as u128) << 64 | lo as u128
    }

    /// `w ^= w << 32 ^ w << 64 ^ w << 96`: the running XOR of the previous round key's
    /// four words (FIPS 197 5.2).
    #[inline]
    #[target_feature(enable = "sse2")]
    fn prefix_xor(mut w: __m128i) -> __m128i {
        let mut t = _mm_slli_si128::<4>(w);
        w = _mm_xor_si128(w, t);
        t = _mm_slli_si128::<4>(t);
        w = _mm_xor_si128(w, t);
        t = _mm_slli_si128::<4>(t);
        _mm_xor_si128(w, t)
    }

    /// AES-256 key expansion (FIPS 197 5.2) with AESKEYGENASSIST: even round keys take
    /// RotWord+SubWord+Rcon of the previous key's last word, odd ones SubWord only.
    #[target_feature(enable = "aes")]
    fn expand(key: &[u8; 32], rk: &mut [u128; ROUNDS + 1]) {
        let mut a = load(u128::from_le_bytes(key[..16].try_into().unwrap_or([0; 16])));
        let mut b = load(u128::from_le_bytes(key[16..].try_into().unwrap_or([0; 16])));
        rk[0] = store(a);
        rk[1] = store(b);
        macro_rules! even {
            ($i:expr, $rcon:literal) => {
                let t = _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(b));
                a = _mm_xor_si128(prefix_xor(a), t);
                rk[$i] = store(a);
            };
        }
        macro_rules! odd {
            ($i:expr) => {
                let t = _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(a));
                b = _mm_xor_si128(prefix_xor(b), t);
                rk[$i] = store(b);
            };
        }
        even!(2, 0x01);
        odd!(3);
        even!(4, 0x02);
        odd!(5);
        even!(6, 0x04);
        odd!(7);
        even!(8, 0x08);
        odd!(9);
        even!(10, 0x10);
        odd!(11);
        even!(12, 0x20);
        odd!(13);
        even!(14, 0x40);
    }

    /// Multiply by alpha in GF(2^128), little-endian (IEEE 1619 5.2), in a vector
    /// register: shift each 32-bit lane left by one, carry each lane's top bit into the
    /// next lane's bottom bit, and fold bit 127 back in as 0x87.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn mul_alpha(t: __m128i) -> __m128i {
        let carry = _mm_shuffle_epi32::<0x93>(_mm_srai_epi32::<31>(t));
        let carry = _mm_and_si128(carry, _mm_set_epi32(1, 1, 1, 0x87));
        _mm_xor_si128(_mm_slli_epi32::<1>(t), carry)
    }

    /// Encrypt (ENC) or decrypt `len` bytes of whole sectors from `src` to `dst` (the
    /// same pointer: in place).
    ///
    /// # Safety
    /// The CPU must have AES-NI. `sector` must be a multiple of 128 bytes (eight blocks)
    /// and `len` of `sector`; `src` readable and `dst` writable for `len` bytes, either
    /// the same or not overlapping.
    #[target_feature(enable = "aes")]
    pub unsafe fn xts<const ENC: bool>(
        k: &Keys,
        src: *const u8,
        dst: *mut u8,
        len: usize,
        sector: usize,
        first: u64,
        iv_step: u64,
    ) {
        let mut rk = [_mm_setzero_si128(); ROUNDS + 1];
        let mut tk = [_mm_setzero_si128(); ROUNDS + 1];
        for i in 0..=ROUNDS {
            rk[i] = load(if ENC { k.enc[i] } else { k.dec[i] });
            tk[i] = load(k.tweak[i]);
        }
        let ns = len / sector;
        let mut s = 0;
        while s < ns {
            // The tweaks of up to eight sectors in one parallel AES pass: the IV as a
            // 128-bit little-endian integer, encrypted with key2.
            let mut t = [_mm_setzero_si128(); 8];
            for (j, t) in t.iter_mut().enumerate() {
                let iv = first.wrapping_add((s + j) as u64 * iv_step);
                *t = _mm_xor_si128(_mm_set_epi64x(0, iv as i64), tk[0]);
            }
            for r in tk.iter().take(ROUNDS).skip(1) {
                for t in t.iter_mut() {
                    *t = _mm_aesenc_si128(*t, *r);
                }
            }
            for t in t.iter_mut() {
                *t = _mm_aesenclast_si128(*t, tk[ROUNDS]);
            }
            for (j, t) in t.iter().enumerate().take(ns - s) {
                let at = (s + j) * sector;
                // SAFETY: the caller's contract (AES-NI; sector `s + j` < `ns` lies
                // inside both ranges and is a multiple of eight blocks).
                unsafe { blocks::<ENC>(&rk, src.add(at), dst.add(at), sector / 16, *t) };
            }
            s += 8;
        }
    }

    /// Encrypt or decrypt `n` blocks (a multiple of 8) from `src` to `dst` whose first
    /// tweak is `t`.
    ///
    /// # Safety
    /// The CPU must have AES-NI; `src` must be readable and `dst` writable for `n * 16`
    /// bytes, the same or not overlapping (each group of 8 blocks is loaded whole before
    /// it is stored).
    #[inline]
    #[target_feature(enable = "aes")]
    unsafe fn blocks<const ENC: bool>(
        rk: &[__m128i; ROUNDS + 1],
        src: *const u8,
        dst: *mut u8,
        n: usize,
        mut t: __m128i,
    ) {
        let (q, o) = (src.cast::<__m128i>(), dst.cast::<__m128i>());
        let mut i = 0;
        while i < n {
            let mut tw = [t; 8];
            for j in 1..8 {
                tw[j] = mul_alpha(tw[j - 1]);
            }
            t = mul_alpha(tw[7]);
            let mut x = [_mm_setzero_si128(); 8];
            for j in 0..8 {
                // SAFETY: block i + j < n is inside the caller's range; unaligned loads
                // because guest buffers have no alignment guarantee.
                let v = unsafe { _mm_loadu_si128(q.add(i + j)) };
                // The tweak whitening and round key 0 in one XOR.
                x[j] = _mm_xor_si128(v, _mm_xor_si128(tw[j], rk[0]));
            }
            for r in rk.iter().take(ROUNDS).skip(1) {
                for x in x.iter_mut() {
                    *x = if ENC {
                        _mm_aesenc_si128(*x, *r)
                    } else {
                        _mm_aesdec_si128(*x, *r)
                    };
                }
            }
            for j in 0..8 {
                // The last round's key XOR and the tweak whitening in one: (AESENCLAST
                // with key k) ^ t = AESENCLAST with key k ^ t.
                let last = _mm_xor_si128(rk[ROUNDS], tw[j]);
                let v = if ENC {
                    _mm_aesenclast_si128(x[j], last)
                } else {
                    _mm_aesdeclast_si128(x[j], last)
                };
                // SAFETY: as for the load above.
                unsafe { _mm_storeu_si128(o.add(i + j), v) };
            }
            i += 8;
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
        for x in [Xts::new(&key), Xts::portable(&key)] {
            let mut buf = pt.clone();
            x.encrypt(&mut buf, 512, 0xff);
            assert_eq!(buf, ct, "{}", x.kernel());
            x.decrypt(&mut buf, 512, 0xff);
            assert_eq!(buf, pt, "{}", x.kernel());
        }
    }

    /// The AES-NI kernel is chosen on a CPU that has AES-NI.
    #[test]
    #[cfg(target_arch = "x86_64")]
    fn aes_ni_is_used_when_present() {
        let x = Xts::new(&[1u8; KEY_BYTES]);
        let want = if std::is_x86_feature_detected!("aes") {
            "aes-ni"
        } else {
            "portable"
        };
        assert_eq!(x.kernel(), want);
    }

    /// A small deterministic generator (xorshift64*) for the randomized cross-checks.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn fill(&mut self, b: &mut [u8]) {
            for c in b.chunks_mut(8) {
                let v = self.next().to_le_bytes();
                c.copy_from_slice(&v[..c.len()]);
            }
        }
    }

    /// Both kernels and RustCrypto's `xts-mode` give the same ciphertext for random keys,
    /// data, sector sizes, lengths and IVs (IVs near 2^64 too), and each decrypts the
    /// others' ciphertext; buffers start at odd addresses (guest buffers have no
    /// alignment).
    #[test]
    fn kernels_agree_with_each_other_and_xts_mode() {
        use aes::cipher::KeyInit;
        use xts_mode::Xts128;
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        for round in 0..200 {
            let mut key = [0u8; KEY_BYTES];
            rng.fill(&mut key);
            let ni = Xts::new(&key);
            let soft = Xts::portable(&key);
            let theirs = Xts128::<Aes256>::new(
                Aes256::new_from_slice(&key[..32]).unwrap(),
                Aes256::new_from_slice(&key[32..]).unwrap(),
            );
            let sector = [512usize, 1024, 2048, 4096][round % 4];
            let nsec = 1 + (rng.next() % 19) as usize;
            let step = [1u64, 8, 3][round % 3];
            let first = if round % 5 == 0 {
                u64::MAX - (rng.next() % 40)
            } else {
                rng.next() >> (rng.next() % 64)
            };
            let mut plain = vec![0u8; sector * nsec + 1];
            rng.fill(&mut plain);
            let plain = &plain[1..];
            let (mut a, mut b) = (plain.to_vec(), vec![0u8; plain.len() + 1]);
            b[1..].copy_from_slice(plain);
            ni.encrypt_iv(&mut a, sector, first, step);
            soft.encrypt_iv(&mut b[1..], sector, first, step);
            assert_eq!(a, b[1..], "round {round}: kernels differ");
            let mut c = plain.to_vec();
            for (i, s) in c.chunks_mut(sector).enumerate() {
                let iv = first.wrapping_add(i as u64 * step);
                theirs.encrypt_sector(s, (iv as u128).to_le_bytes());
            }
            assert_eq!(a, c, "round {round}: xts-mode differs");
            ni.decrypt_iv(&mut b[1..], sector, first, step);
            assert_eq!(&b[1..], plain, "round {round}: AES-NI decrypt");
            soft.decrypt_iv(&mut a, sector, first, step);
            assert_eq!(a, plain, "round {round}: portable decrypt");
            for (i, s) in c.chunks_mut(sector).enumerate() {
                let iv = first.wrapping_add(i as u64 * step);
                theirs.decrypt_sector(s, (iv as u128).to_le_bytes());
            }
            assert_eq!(c, plain, "round {round}: xts-mode decrypt");
        }
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

    /// Encrypting from a source buffer equals copying and encrypting in place, on both
    /// kernels, for unaligned buffers and every sector size.
    #[test]
    fn encrypt_from_equals_in_place() {
        let mut rng = Rng(42);
        for (round, sector) in [512usize, 1024, 2048, 4096]
            .into_iter()
            .cycle()
            .take(16)
            .enumerate()
        {
            let mut key = [0u8; KEY_BYTES];
            rng.fill(&mut key);
            let mut src = vec![0u8; 3 * sector + round];
            rng.fill(&mut src);
            let src = &src[round..];
            for x in [Xts::new(&key), Xts::portable(&key)] {
                let mut a = src.to_vec();
                x.encrypt_iv(&mut a, sector, 77 + round as u64, 8);
                let mut b = vec![0u8; src.len() + 3];
                // SAFETY: `src` is readable for its length, which is `b[3..]`'s.
                unsafe {
                    x.encrypt_iv_from(src.as_ptr(), &mut b[3..], sector, 77 + round as u64, 8)
                };
                assert_eq!(a, b[3..], "{} sector {sector}", x.kernel());
            }
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
