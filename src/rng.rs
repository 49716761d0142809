//! A seeded random number generator of our own, so data order, random masks
//! and sketch matrices are the same on every machine and every version of
//! every crate.

/// SplitMix64 (Steele, Lea and Flood, 2014; the generator behind Java's
/// SplittableRandom): a 64-bit counter stepped by the golden ratio and passed
/// through a mixing function. Statistically sound for shuffles, random masks
/// and random sketch matrices, tiny, and the same on every platform, which is
/// all reproducible training needs. Not for cryptography.
#[derive(Debug, Clone)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng { state: seed }
    }

    /// An independent generator for one use of a seed (an epoch, a layer...):
    /// the same (seed, stream) always gives the same sequence.
    pub fn stream(seed: u64, stream: u64) -> Rng {
        let mut r = Rng::new(seed);
        let s = r.next_u64() ^ stream.wrapping_mul(0xD1B5_4A32_D192_ED03);
        Rng::new(Rng::new(s).next_u64())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n, without modulo bias (Lemire's multiply-and-reject).
    pub fn below(&mut self, n: usize) -> usize {
        assert!(n > 0, "Rng::below(0)");
        let n = n as u64;
        let threshold = n.wrapping_neg() % n; // (2^64 - n) mod n
        loop {
            let m = self.next_u64() as u128 * n as u128;
            if (m as u64) >= threshold {
                return (m >> 64) as usize;
            }
        }
    }

    /// Uniform in [0, 1), from the top 53 bits.
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform in [0, 1), from the top 24 bits.
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// A standard normal sample (Box-Muller; the second value is discarded).
    pub fn normal(&mut self) -> f32 {
        let u1 = 1.0 - self.next_f64(); // (0, 1]: ln is finite
        let u2 = self.next_f64();
        ((-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()) as f32
    }

    /// Two independent standard normal samples (Box-Muller).
    pub fn normal_pair(&mut self) -> (f64, f64) {
        let u1 = 1.0 - self.next_f64(); // in (0, 1], so ln is finite
        let u2 = self.next_f64();
        let radius = (-2.0 * u1.ln()).sqrt();
        let angle = std::f64::consts::TAU * u2;
        (radius * angle.cos(), radius * angle.sin())
    }

    /// Fills `out` with standard normal samples.
    pub fn fill_normal(&mut self, out: &mut [f32]) {
        for pair in out.chunks_mut(2) {
            let (a, b) = self.normal_pair();
            pair[0] = a as f32;
            if pair.len() == 2 {
                pair[1] = b as f32;
            }
        }
    }

    /// Fisher-Yates: every permutation equally likely.
    pub fn shuffle<T>(&mut self, xs: &mut [T]) {
        for i in (1..xs.len()).rev() {
            xs.swap(i, self.below(i + 1));
        }
    }
}
