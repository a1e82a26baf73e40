//! The memory-bandwidth probe's read loop (`nibble bench`'s bound on
//! decoding speed): a sum over a large buffer, in the SIMD form with the
//! software prefetch the one-token interleaved kernels use
//! ([`super::PREFETCH_AHEAD`]). A plain sum leaves the core waiting on the
//! hardware prefetcher: on the 2-vCPU AVX-512 Xeon it read ~25 % below what
//! those kernels stream, so a bound measured that way could be exceeded.

/// Scalar reference: the wrapping sum of `buf`.
pub fn stream_sum_scalar(buf: &[u64]) -> u64 {
    buf.iter().fold(0u64, |a, &b| a.wrapping_add(b))
}

/// The wrapping sum of `buf`, as fast as this CPU streams it: AVX2 loads
/// with prefetches [`super::PREFETCH_AHEAD`] bytes ahead where the CPU has
/// AVX2, else the reference.
pub fn stream_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { x86::stream_sum_avx2(buf) };
    }
    stream_sum_scalar(buf)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use std::arch::x86_64::*;

    /// Four 256-bit sums over 128 bytes per step; the ragged tail by the
    /// reference. SAFETY (caller): the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn stream_sum_avx2(buf: &[u64]) -> u64 {
        let steps = buf.len() / 16;
        let p = buf.as_ptr();
        let mut acc = [_mm256_setzero_si256(); 4];
        for i in 0..steps {
            // SAFETY: 16 values from 16·i are inside `buf`; a prefetch
            // never faults, so past the end it is only a wasted hint.
            unsafe {
                let at = p.add(16 * i);
                let ahead = (at as *const i8).wrapping_add(super::super::PREFETCH_AHEAD);
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                for (k, a) in acc.iter_mut().enumerate() {
                    let v = _mm256_loadu_si256(at.add(4 * k) as *const __m256i);
                    *a = _mm256_add_epi64(*a, v);
                }
            }
        }
        let mut lanes = [0u64; 4];
        let total = acc
            .iter()
            .fold(_mm256_setzero_si256(), |s, &a| _mm256_add_epi64(s, a));
        // SAFETY: 32 bytes into a 32-byte array.
        unsafe { _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, total) };
        let tail = super::stream_sum_scalar(&buf[16 * steps..]);
        lanes.iter().fold(tail, |s, &v| s.wrapping_add(v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fast_sum_equals_the_reference() {
        for n in [0usize, 1, 15, 16, 17, 1000, 4099] {
            let buf: Vec<u64> = (0..n as u64)
                .map(|i| i.wrapping_mul(0x9E37_79B9_7F4A_7C15))
                .collect();
            assert_eq!(stream_sum(&buf), stream_sum_scalar(&buf), "n {n}");
        }
    }
}
