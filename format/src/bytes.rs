//! A bounds-checked little-endian cursor over a byte slice, shared by the
//! `.nib` and GGUF parsers. Every read checks the remaining length first, so a
//! truncated or hostile file produces `FormatError::Truncated`, never a panic.

use crate::error::{FormatError, Result};

pub(crate) struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
    /// Absolute file offset of `buf[0]`, for error messages.
    base: u64,
}

impl<'a> Cursor<'a> {
    pub fn new(buf: &'a [u8], base: u64) -> Self {
        Cursor { buf, pos: 0, base }
    }

    pub fn pos(&self) -> usize {
        self.pos
    }

    pub fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    pub fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let have = self.remaining() as u64;
        if n > have {
            return Err(FormatError::Truncated {
                what: what(),
                offset: self.base + self.pos as u64,
                need: n,
                have,
            });
        }
        let n = n as usize; // n <= remaining, so it fits in usize
        let out = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(out)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8> {
        Ok(self.array::<1>(what)?[0])
    }
    pub fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }
    pub fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }
    pub fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A UTF-8 string of `len` bytes.
    pub fn str(&mut self, len: u64, what: &dyn Fn() -> String) -> Result<&'a str> {
        let bytes = self.take(len, what)?;
        std::str::from_utf8(bytes).map_err(|_| FormatError::BadUtf8 { what: what() })
    }
}

/// `a * b` for byte-size arithmetic, as a typed error on overflow.
pub(crate) fn mul(a: u64, b: u64, what: &dyn Fn() -> String) -> Result<u64> {
    a.checked_mul(b).ok_or_else(|| FormatError::BadValue {
        key: what(),
        why: format!("{a} * {b} overflows"),
    })
}

/// `a + b` for offsets, as a typed error on overflow.
pub(crate) fn add(a: u64, b: u64, what: &dyn Fn() -> String) -> Result<u64> {
    a.checked_add(b).ok_or_else(|| FormatError::BadValue {
        key: what(),
        why: format!("{a} + {b} overflows"),
    })
}

/// Round `x` up to a multiple of `align` (a power of two), checked.
pub(crate) fn align_up(x: u64, align: u64) -> Option<u64> {
    debug_assert!(align.is_power_of_two());
    x.checked_add(align - 1).map(|v| v & !(align - 1))
}

impl<'a> Cursor<'a> {
    /// The bytes between two earlier positions of this cursor.
    pub fn raw_range(&self, start: usize, end: usize) -> &'a [u8] {
        &self.buf[start..end]
    }
}
