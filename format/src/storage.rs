//! Where `.nib` bytes live: a memory-mapped file (zero-copy load) or a
//! 64-byte-aligned heap buffer (models converted in memory), behind one
//! owned type, [`NibFile`]; and [`AtomicFile`], the output sink that never
//! leaves a partial file, and never replaces an input or a non-file.

use std::fs::File;
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::error::{FormatError, Result};
use crate::nib::NibView;

/// One 64-byte, 64-aligned block: the unit of [`AlignedBytes`].
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Block([u8; 64]);

/// A growable byte buffer whose start is 64-byte aligned, so typed views of
/// 64-aligned tensors (`&[f32]`, `&[u16]`) are always valid. Implements
/// `Write + Seek` so [`crate::NibWriter`] can target it directly.
#[derive(Clone, Default)]
pub struct AlignedBytes {
    blocks: Vec<Block>,
    len: usize,
    pos: usize,
}

impl AlignedBytes {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn as_slice(&self) -> &[u8] {
        &bytemuck::cast_slice::<Block, u8>(&self.blocks)[..self.len]
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// An empty buffer with room for `bytes` without reallocating.
    pub fn with_capacity(bytes: usize) -> Self {
        AlignedBytes {
            blocks: Vec::with_capacity(bytes.div_ceil(64)),
            len: 0,
            pos: 0,
        }
    }

    /// Copy arbitrary bytes into a fresh aligned buffer.
    pub fn from_slice(bytes: &[u8]) -> Self {
        let mut a = AlignedBytes::new();
        a.write_all(bytes).expect("writing to memory cannot fail");
        a
    }
}

impl Write for AlignedBytes {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let end = self.pos + buf.len();
        let need_blocks = end.div_ceil(64);
        if need_blocks > self.blocks.len() {
            // Within a reserved capacity, grow only to what is needed (no doubling
            // of a multi-hundred-MB model image); beyond it, amortized doubling.
            let grow = if need_blocks <= self.blocks.capacity() {
                need_blocks
            } else {
                need_blocks.max(self.blocks.len() * 2)
            };
            self.blocks.resize(grow, Block([0; 64]));
        }
        let bytes = bytemuck::cast_slice_mut::<Block, u8>(&mut self.blocks);
        bytes[self.pos..end].copy_from_slice(buf);
        self.pos = end;
        self.len = self.len.max(end);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Seek for AlignedBytes {
    fn seek(&mut self, to: SeekFrom) -> std::io::Result<u64> {
        let new = match to {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => (self.len as u64).checked_add_signed(d),
            SeekFrom::Current(d) => (self.pos as u64).checked_add_signed(d),
        };
        match new.and_then(|p| usize::try_from(p).ok()) {
            Some(p) => {
                self.pos = p;
                Ok(p as u64)
            }
            None => Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "seek out of range",
            )),
        }
    }
}

/// Memory-map a file read-only.
pub fn mmap_file(path: &Path) -> Result<memmap2::Mmap> {
    let file = File::open(path).map_err(|e| FormatError::io(path, e))?;
    // SAFETY: the map is read-only and private to this process. Soundness
    // requires that no one truncates or rewrites the file while it is mapped;
    // nibble never modifies an existing file in place (writers create a temp
    // file and rename it over the target, which leaves existing maps intact).
    let map = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| FormatError::io(path, e))?;
    Ok(map)
}

enum Backing {
    Mmap(memmap2::Mmap),
    Memory(AlignedBytes),
}

/// An owned, validated `.nib` image: memory-mapped from disk or held in memory.
pub struct NibFile {
    backing: Backing,
    path: Option<PathBuf>,
}

impl NibFile {
    /// Memory-map and validate a `.nib` file (header, metadata, directory;
    /// not the checksums). Errors name the file.
    pub fn open(path: impl AsRef<Path>) -> Result<NibFile> {
        let path = path.as_ref();
        if path.is_dir() {
            return Err(FormatError::BadConfig {
                why: "this is a folder, not a .nib file (`nibble convert -m FOLDER -o model.nib` \
                      writes one)"
                    .into(),
            }
            .in_file(path));
        }
        let map = mmap_file(path)?;
        let file = NibFile {
            backing: Backing::Mmap(map),
            path: Some(path.to_path_buf()),
        };
        file.view()?;
        Ok(file)
    }

    /// Memory-map and validate the `.nib` written into an unnamed scratch
    /// file ([`scratch_file`]); `name` is what errors call it.
    pub fn from_scratch(file: &File, name: &Path) -> Result<NibFile> {
        // SAFETY: the file is unnamed (O_TMPFILE) and its only handle is this
        // process's: nobody else can open, truncate or rewrite it, and nibble
        // does not write to it after this point. The map stays valid after
        // the handle is closed.
        let map = unsafe { memmap2::Mmap::map(file) }.map_err(|e| FormatError::io(name, e))?;
        let file = NibFile {
            backing: Backing::Mmap(map),
            path: None,
        };
        file.view()?;
        Ok(file)
    }

    /// Validate an in-memory image.
    pub fn from_memory(bytes: AlignedBytes) -> Result<NibFile> {
        let file = NibFile {
            backing: Backing::Memory(bytes),
            path: None,
        };
        file.view()?;
        Ok(file)
    }

    pub fn bytes(&self) -> &[u8] {
        match &self.backing {
            Backing::Mmap(m) => m,
            Backing::Memory(a) => a.as_slice(),
        }
    }

    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Drop the resident pages of `bytes()[offset..offset + len]` from this
    /// process (`madvise(MADV_DONTNEED)` on the whole pages inside the
    /// range), for data the caller has copied elsewhere (the runtime's
    /// interleaved weights): the copy then does not cost the model's size a
    /// second time in resident memory. The bytes stay readable and
    /// unchanged; a later read faults them back in from the file (the page
    /// cache). Returns the bytes released: 0 for an in-memory image, on
    /// non-Unix systems, or when the range holds no whole page.
    pub fn release_pages(&self, offset: usize, len: usize) -> usize {
        let Backing::Mmap(map) = &self.backing else {
            return 0;
        };
        release_mapped_pages(map, offset, len)
    }
}

#[cfg(unix)]
pub(crate) fn release_mapped_pages(map: &memmap2::Mmap, offset: usize, len: usize) -> usize {
    // SAFETY: sysconf has no preconditions.
    let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(0);
    let end = offset.saturating_add(len).min(map.len());
    if page == 0 || !page.is_power_of_two() || offset >= end {
        return 0;
    }
    // Whole pages inside the range only (a map starts on a page boundary).
    let start = match offset.checked_next_multiple_of(page) {
        Some(s) => s,
        None => return 0,
    };
    let stop = end / page * page;
    if stop <= start {
        return 0;
    }
    // SAFETY: `Mmap::map` maps the file read-only and shared; nibble never
    // writes through it and never modifies a mapped file in place (see
    // `mmap_file`). MADV_DONTNEED on such a mapping only drops this
    // process's page-table entries: the next read of those addresses maps
    // the same file contents again, so every `&[u8]` borrowed from the map
    // keeps seeing the same bytes. The range lies inside the map.
    let res = unsafe {
        map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, stop - start)
    };
    match res {
        Ok(()) => stop - start,
        Err(_) => 0,
    }
}

#[cfg(not(unix))]
pub(crate) fn release_mapped_pages(_map: &memmap2::Mmap, _offset: usize, _len: usize) -> usize {
    0
}

impl NibFile {
    /// A parsed view (re-parses the header, metadata and directory: O(metadata)).
    pub fn view(&self) -> Result<NibView<'_>> {
        NibView::parse(self.bytes()).map_err(|e| match &self.path {
            Some(p) => e.in_file(p),
            None => e,
        })
    }
}

/// A file that appears at its destination only complete: written unnamed
/// (`O_TMPFILE` on Linux, where the filesystem supports it; nothing is left
/// behind even after SIGKILL) or else through a named temp file in the same
/// directory, and linked / renamed into place only by [`AtomicFile::commit`].
/// Dropping it uncommitted (an error, an unwinding panic) deletes a named
/// temp file.
pub struct AtomicFile {
    file: Option<std::io::BufWriter<File>>,
    /// The named temp file; `None` while the file is unnamed.
    tmp: Option<PathBuf>,
    dest: PathBuf,
}

/// What `m` is, in words, for an error message.
fn file_kind(m: &std::fs::Metadata) -> &'static str {
    let t = m.file_type();
    if t.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_fifo() {
            return "a pipe";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    "not a regular file"
}

/// The same file on disk (symlinks resolved).
fn same_file(a: &std::fs::Metadata, b: &std::fs::Metadata) -> bool {
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        a.dev() == b.dev() && a.ino() == b.ino()
    }
    #[cfg(not(unix))]
    {
        let _ = (a, b);
        false
    }
}

/// Refuse an output path that is not a regular file (a directory, a device
/// such as `/dev/full`, a pipe) or that is one of the files a command reads:
/// an input file, or a file directly inside an input folder (symlinks
/// resolved), which the write would destroy.
pub fn check_output(dest: &Path, inputs: &[&Path]) -> Result<()> {
    let bad = |why: String| FormatError::BadOutput {
        path: dest.to_path_buf(),
        why,
    };
    let Ok(out) = std::fs::metadata(dest) else {
        return Ok(());
    };
    if !out.is_file() {
        return Err(bad(format!(
            "it exists and is {}; nibble only replaces regular files",
            file_kind(&out)
        )));
    }
    for &input in inputs {
        let Ok(m) = std::fs::metadata(input) else {
            continue;
        };
        let mut read = vec![(input.to_path_buf(), m.clone())];
        if m.is_dir() {
            if let Ok(entries) = std::fs::read_dir(input) {
                for e in entries.flatten() {
                    if let Ok(em) = std::fs::metadata(e.path()) {
                        read.push((e.path(), em));
                    }
                }
            }
        }
        if let Some((p, _)) = read.iter().find(|(_, m)| same_file(m, &out)) {
            return Err(bad(format!(
                "it is the input {}; writing it would destroy the source (choose another output)",
                p.display()
            )));
        }
    }
    Ok(())
}

/// An unnamed read-write file in the system's temporary folder (Linux
/// `O_TMPFILE`), gone when its last handle and map are: room to build a
/// `.nib` image on disk and map it, so that its pages are the page cache's
/// rather than anonymous memory. `None` where the system has no such files.
pub fn scratch_file() -> Option<File> {
    unnamed_in(&std::env::temp_dir())
}

/// An unnamed file in `dir` (Linux `O_TMPFILE`), where the filesystem has it.
#[cfg(target_os = "linux")]
fn unnamed_in(dir: &Path) -> Option<File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_TMPFILE)
        .mode(0o644)
        .open(dir)
        .ok()
}

#[cfg(not(target_os = "linux"))]
fn unnamed_in(_dir: &Path) -> Option<File> {
    None
}

impl AtomicFile {
    /// [`AtomicFile::create_checked`] with no inputs to protect.
    pub fn create(dest: impl AsRef<Path>) -> Result<AtomicFile> {
        Self::create_checked(dest.as_ref(), &[])
    }

    /// A new output at `dest`, after [`check_output`] against `inputs`.
    pub fn create_checked(dest: &Path, inputs: &[&Path]) -> Result<AtomicFile> {
        check_output(dest, inputs)?;
        let dest = dest.to_path_buf();
        if dest.file_name().is_none() {
            return Err(FormatError::BadOutput {
                path: dest,
                why: "the path has no file name".into(),
            });
        }
        let dir = match dest.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let (file, tmp) = match unnamed_in(&dir) {
            Some(f) => (f, None),
            None => {
                let tmp = Self::temp_name(&dest);
                let f = File::create(&tmp).map_err(|e| FormatError::io(&tmp, e))?;
                (f, Some(tmp))
            }
        };
        Ok(AtomicFile {
            file: Some(std::io::BufWriter::with_capacity(1 << 20, file)),
            tmp,
            dest,
        })
    }

    /// `.NAME.tmp-PID` beside `dest`.
    fn temp_name(dest: &Path) -> PathBuf {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        dest.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
    }

    /// Flush, fsync, and put the file in place (link an unnamed file under a
    /// temp name, then rename over the destination); on failure nothing is
    /// left behind.
    pub fn commit(mut self) -> Result<()> {
        let w = self.file.take().expect("committed once");
        let tmp_or_dest = self.tmp.clone().unwrap_or_else(|| self.dest.clone());
        let file = w
            .into_inner()
            .map_err(|e| FormatError::io(&tmp_or_dest, e.into_error()))?;
        file.sync_all()
            .map_err(|e| FormatError::io(&tmp_or_dest, e))?;
        if self.tmp.is_none() {
            let tmp = Self::temp_name(&self.dest);
            link_unnamed(&file, &tmp).map_err(|e| FormatError::io(&self.dest, e))?;
            self.tmp = Some(tmp);
        }
        drop(file);
        let tmp = self.tmp.take().expect("named by now");
        if let Err(e) = std::fs::rename(&tmp, &self.dest) {
            let _ = std::fs::remove_file(&tmp);
            return Err(FormatError::io(&self.dest, e));
        }
        if let Some(dir) = self.dest.parent().filter(|d| !d.as_os_str().is_empty()) {
            // Persist the rename itself; not all platforms allow opening a directory.
            if let Ok(d) = File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    pub fn dest(&self) -> &Path {
        &self.dest
    }
}

/// Give the unnamed (`O_TMPFILE`) `file` the name `path`.
#[cfg(target_os = "linux")]
fn link_unnamed(file: &File, path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let proc_path = format!("/proc/self/fd/{}", file.as_raw_fd());
    rustix::fs::linkat(
        rustix::fs::CWD,
        proc_path.as_str(),
        rustix::fs::CWD,
        path,
        rustix::fs::AtFlags::SYMLINK_FOLLOW,
    )
    .map_err(std::io::Error::from)
}

#[cfg(not(target_os = "linux"))]
fn link_unnamed(_file: &File, _path: &Path) -> std::io::Result<()> {
    unreachable!("unnamed files exist only on Linux")
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.as_mut().expect("not committed").write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.file.as_mut().expect("not committed").flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> std::io::Result<u64> {
        self.file.as_mut().expect("not committed").seek(pos)
    }
}

impl Drop for AtomicFile {
    fn drop(&mut self) {
        if let Some(tmp) = self.tmp.take() {
            let _ = std::fs::remove_file(tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{DType, MetadataBuilder, NibWriter};

    /// Resident file-backed memory of this process (Linux), in bytes.
    #[cfg(target_os = "linux")]
    fn rss_file() -> Option<usize> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("RssFile:"))?;
        let kb: usize = line.split_whitespace().nth(1)?.parse().ok()?;
        Some(kb * 1024)
    }

    #[test]
    fn released_pages_read_back_unchanged() {
        let n = 8 << 20; // bytes: 2 Mi F32 values
        let data: Vec<u8> = (0..n).map(|i| (i * 7 + i / 4093) as u8).collect();
        let path =
            std::env::temp_dir().join(format!("nibble-release-pages-{}.nib", std::process::id()));
        let mut af = AtomicFile::create(&path).unwrap();
        let mut w = NibWriter::new(&mut af, &MetadataBuilder::new()).unwrap();
        w.add_tensor("big", DType::F32, &[(n / 4) as u64], &data)
            .unwrap();
        w.finish().unwrap();
        af.commit().unwrap();

        let file = NibFile::open(&path).unwrap();
        let view = file.view().unwrap();
        let t = view.tensor("big").unwrap();
        let off = t.data.as_ptr() as usize - file.bytes().as_ptr() as usize;
        drop(view);
        let bytes = &file.bytes()[off..off + n];
        // Touch every page, so that it is resident.
        let sum: u64 = bytes.iter().step_by(1024).map(|&b| b as u64).sum();
        assert!(sum > 0);
        #[cfg(target_os = "linux")]
        let before = rss_file();

        // Odd bounds: only the whole pages inside are released.
        let released = file.release_pages(off + 1, n - 2);
        #[cfg(unix)]
        {
            assert!(released > n - 3 * 65536 && released < n, "{released}");
            assert_eq!(released % 4096, 0);
        }
        #[cfg(target_os = "linux")]
        if let (Some(b), Some(a)) = (before, rss_file()) {
            // Other tests may map files meanwhile; the drop is still most of it.
            assert!(
                b > a + released / 2,
                "RssFile {b} -> {a}, released {released}"
            );
        }
        // Reads fault the same bytes back in.
        assert!(
            bytes == &data[..],
            "released pages read back different bytes"
        );
        // Ranges outside the map or without a whole page release nothing.
        assert_eq!(file.release_pages(file.bytes().len() + 10, 100), 0);
        assert_eq!(file.release_pages(off + 1, 100), 0);
        let mem =
            NibFile::from_memory(AlignedBytes::from_slice(&std::fs::read(&path).unwrap())).unwrap();
        assert_eq!(mem.release_pages(0, mem.bytes().len()), 0);
        drop(file);
        let _ = std::fs::remove_file(&path);
    }
}
