//! Incompressible-looking test data.

use std::fs::File;
use std::io::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use bytes::Bytes;

/// Size of the blocks test data is generated and sent in.
pub const BLOCK: usize = 1 << 20;

/// `len` pseudo-random bytes from `seed` (xorshift64*; fast, not cryptographic).
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        out.extend_from_slice(&state.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Writes `size` bytes of real (non-sparse) pseudo-random data to `path` and
/// syncs it, so later reads come from the page cache and no writeback runs
/// during the measurements.
pub fn write_file(path: &Path, size: u64) -> Result<()> {
    let mut file = File::create(path).with_context(|| format!("create {}", path.display()))?;
    let mut left = size;
    let mut seed = 1;
    while left > 0 {
        let n = left.min(BLOCK as u64) as usize;
        file.write_all(&pattern(n, seed))
            .with_context(|| format!("write {}", path.display()))?;
        left -= n as u64;
        seed += 1;
    }
    file.sync_all()
        .with_context(|| format!("sync {}", path.display()))
}

/// `size` bytes as a sequence of [`BLOCK`]-sized slices of one random block
/// (cheap clones: every chunk shares `block`'s memory).
pub fn chunks(block: &Bytes, size: u64) -> impl Iterator<Item = Bytes> + Send + Sync + 'static {
    let block = block.clone();
    let full = size / block.len() as u64;
    let rest = (size % block.len() as u64) as usize;
    let tail = (rest > 0).then(|| block.slice(..rest));
    std::iter::repeat_n(block, full as usize).chain(tail)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_add_up() {
        let block = Bytes::from(pattern(1000, 7));
        let total: usize = chunks(&block, 2500).map(|c| c.len()).sum();
        assert_eq!(total, 2500);
        assert_eq!(chunks(&block, 2000).count(), 2);
    }

    #[test]
    fn pattern_is_deterministic_and_varied() {
        assert_eq!(pattern(64, 3), pattern(64, 3));
        assert_ne!(pattern(64, 3), pattern(64, 4));
        let p = pattern(4096, 1);
        assert!(p.iter().filter(|&&b| b == 0).count() < 100);
    }
}
