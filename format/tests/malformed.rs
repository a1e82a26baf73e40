//! Malformed `.nib` files: a corpus of hand-made broken files, each of which
//! must produce a specific typed error, plus a mutation test that flips and
//! truncates bytes of a valid file ≥ 100k times without a panic.
//!
//! Files are built by `Raw`, a byte-level encoder written from FORMAT.md and
//! independent of `NibWriter`, so the test also checks the writer's layout.

use nibble_format::{DType, FormatError, MetadataBuilder, NibView, NibWriter, OwnedValue};

#[derive(Clone)]
struct RawTensor {
    name: Vec<u8>,
    dtype: u16,
    n_dims: Option<u16>,
    qparam: u32,
    dims: Vec<u64>,
    offset: u64,
    nbytes: u64,
    crc: u32,
}

/// A `.nib` image described field by field (FORMAT.md), with overrides.
#[derive(Clone)]
struct Raw {
    magic: [u8; 8],
    version: u32,
    header_len: u32,
    meta_count: Option<u32>,
    /// Encoded metadata entries (key len, key, type, value).
    meta: Vec<Vec<u8>>,
    meta_extra: Vec<u8>,
    tensor_count: Option<u32>,
    tensors: Vec<RawTensor>,
    data: Vec<u8>,
    /// (field index 0..6 in the header after header_len, value) overrides.
    header_override: Vec<(usize, u64)>,
    /// Version 2: replaces the metadata and directory CRC-32s computed from
    /// the sections.
    crc_override: Option<(u32, u32)>,
}

fn entry(key: &[u8], ty: u8, value: &[u8]) -> Vec<u8> {
    let mut e = (key.len() as u16).to_le_bytes().to_vec();
    e.extend_from_slice(key);
    e.push(ty);
    e.extend_from_slice(value);
    e
}

fn str_value(s: &[u8]) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s);
    v
}

impl Raw {
    fn valid() -> Raw {
        let a: Vec<u8> = (0..6 * 4u32)
            .flat_map(|i| (i as f32).to_le_bytes())
            .collect();
        let b: Vec<u8> = (0..3u16)
            .flat_map(|i| half::f16::from_f32(f32::from(i)).to_le_bytes())
            .collect();
        let mut data = a.clone();
        data.resize(128, 0);
        data.extend_from_slice(&b);
        Raw {
            magic: *b"\x89NIB\r\n\x1a\n",
            version: 2,
            header_len: 72,
            meta_count: None,
            meta: vec![
                entry(b"general.architecture", 5, &str_value(b"llama")),
                entry(b"model.n_embd", 1, &4u64.to_le_bytes()),
                entry(b"model.tie_embeddings", 4, &[1]),
            ],
            meta_extra: vec![],
            tensor_count: None,
            tensors: vec![
                RawTensor {
                    name: b"a.weight".to_vec(),
                    dtype: 0,
                    n_dims: None,
                    qparam: 0,
                    dims: vec![6, 4],
                    offset: 0,
                    nbytes: 96,
                    crc: crc32fast::hash(&a),
                },
                RawTensor {
                    name: b"b.weight".to_vec(),
                    dtype: 1,
                    n_dims: None,
                    qparam: 0,
                    dims: vec![3],
                    offset: 128,
                    nbytes: 6,
                    crc: crc32fast::hash(&b),
                },
            ],
            data,
            header_override: vec![],
            crc_override: None,
        }
    }

    /// The same file in format version 1 (64-byte header, no section
    /// checksums), as nibble wrote it before.
    fn valid_v1() -> Raw {
        Raw {
            version: 1,
            header_len: 64,
            ..Raw::valid()
        }
    }

    fn build(&self) -> Vec<u8> {
        let mut meta = self
            .meta_count
            .unwrap_or(self.meta.len() as u32)
            .to_le_bytes()
            .to_vec();
        for e in &self.meta {
            meta.extend_from_slice(e);
        }
        meta.extend_from_slice(&self.meta_extra);
        let mut dir = self
            .tensor_count
            .unwrap_or(self.tensors.len() as u32)
            .to_le_bytes()
            .to_vec();
        for t in &self.tensors {
            dir.extend_from_slice(&(t.name.len() as u16).to_le_bytes());
            dir.extend_from_slice(&t.name);
            dir.extend_from_slice(&t.dtype.to_le_bytes());
            dir.extend_from_slice(&t.n_dims.unwrap_or(t.dims.len() as u16).to_le_bytes());
            dir.extend_from_slice(&t.qparam.to_le_bytes());
            for d in &t.dims {
                dir.extend_from_slice(&d.to_le_bytes());
            }
            dir.extend_from_slice(&t.offset.to_le_bytes());
            dir.extend_from_slice(&t.nbytes.to_le_bytes());
            dir.extend_from_slice(&t.crc.to_le_bytes());
        }
        let v2 = self.version >= 2;
        let meta_offset = if v2 { 72u64 } else { 64 };
        let data_offset = (meta_offset + meta.len() as u64).div_ceil(64) * 64;
        let dir_offset = data_offset + self.data.len() as u64;
        let mut fields = [
            meta_offset,
            meta.len() as u64,
            dir_offset,
            dir.len() as u64,
            data_offset,
            self.data.len() as u64,
        ];
        for &(i, v) in &self.header_override {
            fields[i] = v;
        }
        let mut out = self.magic.to_vec();
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&self.header_len.to_le_bytes());
        for f in fields {
            out.extend_from_slice(&f.to_le_bytes());
        }
        if v2 {
            let (m, d) = self
                .crc_override
                .unwrap_or((crc32fast::hash(&meta), crc32fast::hash(&dir)));
            out.extend_from_slice(&m.to_le_bytes());
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&meta);
        out.resize(data_offset as usize, 0);
        out.extend_from_slice(&self.data);
        out.extend_from_slice(&dir);
        out
    }
}

const META_LEN: usize = 1;
const DIR_OFFSET: usize = 2;
const DATA_OFFSET: usize = 4;

fn parse_err(bytes: &[u8]) -> FormatError {
    match NibView::parse(bytes) {
        Ok(_) => panic!("malformed file parsed successfully"),
        Err(e) => e,
    }
}

#[test]
fn raw_encoder_and_writer_agree_and_parse() {
    let raw = Raw::valid().build();
    let v = NibView::parse(&raw).expect("valid");
    assert_eq!(v.tensors.len(), 2);
    assert_eq!(v.tensor("a.weight").unwrap().shape, vec![6, 4]);
    assert_eq!(v.metadata.str("general.architecture").unwrap(), "llama");
    assert!(v.metadata.bool("model.tie_embeddings").unwrap());
    v.verify_checksums().unwrap();

    // The writer must produce the very same bytes.
    let mut m = MetadataBuilder::new();
    m.set("general.architecture", OwnedValue::Str("llama".into()));
    m.set("model.n_embd", OwnedValue::U64(4));
    m.set("model.tie_embeddings", OwnedValue::Bool(true));
    let mut w = NibWriter::new(std::io::Cursor::new(Vec::new()), &m).unwrap();
    let r = Raw::valid();
    w.add_tensor("a.weight", DType::F32, &[6, 4], &r.data[..96])
        .unwrap();
    w.add_tensor("b.weight", DType::F16, &[3], &r.data[128..134])
        .unwrap();
    let written = w.finish().unwrap().into_inner();
    assert_eq!(written, raw);
}

/// The corpus: (name, broken bytes, check on the error).
type Case = (&'static str, Vec<u8>, fn(&FormatError) -> bool);

fn corpus() -> Vec<Case> {
    let v = Raw::valid();
    let good = v.build();
    let mut cases: Vec<Case> = Vec::new();
    let mut add = |name, bytes, check| cases.push((name, bytes, check));

    add("empty file", vec![], |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    add("truncated header", good[..30].to_vec(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    let mut r = v.clone();
    r.magic = *b"GGUF\0\0\0\0";
    add("bad magic", r.build(), |e| {
        matches!(e, FormatError::BadMagic { .. })
    });
    let mut r = v.clone();
    r.version = 3;
    add("future version", r.build(), |e| {
        matches!(e, FormatError::UnsupportedVersion { found: 3, .. })
    });
    let mut r = v.clone();
    r.header_len = 80;
    add("bad header length", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = v.clone();
    r.header_len = 64;
    add("version 2 with version 1's header length", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = Raw::valid_v1();
    r.header_len = 72;
    add("version 1 with version 2's header length", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    add("truncated in data", good[..good.len() - 40].to_vec(), |e| {
        matches!(e, FormatError::OutOfBounds { .. })
    });
    let mut r = v.clone();
    r.header_override.push((META_LEN, 1 << 40));
    add("metadata past end of file", r.build(), |e| {
        matches!(e, FormatError::OutOfBounds { .. })
    });
    let mut r = v.clone();
    r.header_override.push((DIR_OFFSET, u64::MAX - 3));
    add("directory offset overflows", r.build(), |e| {
        matches!(e, FormatError::OutOfBounds { .. })
    });
    let mut r = v.clone();
    r.header_override.push((DIR_OFFSET, 72));
    add("directory overlaps metadata", r.build(), |e| {
        matches!(e, FormatError::Overlap { .. })
    });
    let mut r = v.clone();
    let data_off = {
        let meta_len: usize = 4 + r.meta.iter().map(Vec::len).sum::<usize>();
        (64 + meta_len as u64).div_ceil(64) * 64
    };
    r.header_override.push((DATA_OFFSET, data_off + 1));
    r.header_override.push((5, 100)); // keep it inside the file and off the directory
    add("misaligned data section", r.build(), |e| {
        matches!(e, FormatError::Misaligned { .. })
    });
    let mut r = v.clone();
    r.meta_count = Some(u32::MAX);
    add("huge metadata count", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let mut r = v.clone();
    r.tensor_count = Some(1 << 30);
    add("huge tensor count", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let mut r = v.clone();
    r.tensor_count = Some(3);
    add("tensor count beyond directory", r.build(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    let mut r = v.clone();
    r.meta[0] = entry(b"general.\xffrch", 5, &str_value(b"llama"));
    add("metadata key not UTF-8", r.build(), |e| {
        matches!(e, FormatError::BadUtf8 { .. })
    });
    let mut r = v.clone();
    r.meta[0] = entry(b"general.architecture", 5, &str_value(b"ll\xc3ma"));
    add("metadata string not UTF-8", r.build(), |e| {
        matches!(e, FormatError::BadUtf8 { .. })
    });
    let mut r = v.clone();
    r.tensors[1].name = b"b.w\xffight".to_vec();
    add("tensor name not UTF-8", r.build(), |e| {
        matches!(e, FormatError::BadUtf8 { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dtype = 99;
    add("unknown dtype", r.build(), |e| {
        matches!(e, FormatError::UnknownDtype { code: 99, .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![7, 4];
    add("shape does not match length", r.build(), |e| {
        matches!(e, FormatError::ShapeMismatch { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![u64::MAX, 4];
    add("shape product overflows", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = v.clone();
    r.tensors[0].dims = vec![0, 4];
    r.tensors[0].nbytes = 0;
    add("zero-sized dimension", r.build(), |e| {
        matches!(e, FormatError::BadShape { .. })
    });
    let mut r = v.clone();
    r.tensors[0].n_dims = Some(9);
    add("too many dimensions", r.build(), |e| {
        matches!(e, FormatError::BadShape { .. })
    });
    let mut r = v.clone();
    r.tensors[1].offset = 4096;
    add("tensor out of bounds", r.build(), |e| {
        matches!(e, FormatError::OutOfBounds { .. })
    });
    let mut r = v.clone();
    r.tensors[1].offset = 100;
    add("misaligned tensor", r.build(), |e| {
        matches!(e, FormatError::Misaligned { .. })
    });
    let mut r = v.clone();
    r.tensors[1].offset = 64;
    add("overlapping tensors", r.build(), |e| {
        matches!(e, FormatError::Overlap { .. })
    });
    let mut r = v.clone();
    r.tensors[1].name = b"a.weight".to_vec();
    add("duplicate tensor name", r.build(), |e| {
        matches!(e, FormatError::Duplicate { .. })
    });
    let mut r = v.clone();
    r.meta.push(entry(b"model.n_embd", 1, &5u64.to_le_bytes()));
    add("duplicate metadata key", r.build(), |e| {
        matches!(e, FormatError::Duplicate { .. })
    });
    let mut r = v.clone();
    r.meta.push(entry(b"x", 42, &[]));
    add("unknown value type", r.build(), |e| {
        matches!(e, FormatError::UnknownValueType { code: 42, .. })
    });
    let mut r = v.clone();
    r.meta[2] = entry(b"model.tie_embeddings", 4, &[7]);
    add("bool byte not 0/1", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = v.clone();
    r.meta[0] = entry(b"general.architecture", 5, &(1u64 << 50).to_le_bytes());
    add("string longer than section", r.build(), |e| {
        matches!(e, FormatError::Truncated { .. })
    });
    let mut r = v.clone();
    r.meta.push(entry(b"ids", 7, &(1u64 << 40).to_le_bytes()));
    add("huge array", r.build(), |e| {
        matches!(e, FormatError::CountTooLarge { .. })
    });
    let mut r = v.clone();
    r.meta_extra = vec![0, 0, 0];
    add("trailing bytes in metadata", r.build(), |e| {
        matches!(e, FormatError::TrailingBytes { .. })
    });
    let mut r = v.clone();
    r.meta.push(entry(b"", 1, &0u64.to_le_bytes()));
    add("empty metadata key", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    let mut r = v.clone();
    r.tensors[0].qparam = 32;
    add("quant parameter on a float type", r.build(), |e| {
        matches!(e, FormatError::BadValue { .. })
    });
    cases
}

#[test]
fn malformed_corpus_gives_typed_errors() {
    let cases = corpus();
    assert!(cases.len() >= 20);
    // Keep the corpus on disk too (seeds for the cargo-fuzz target).
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("nib-corpus");
    std::fs::create_dir_all(&dir).unwrap();
    for (i, (name, bytes, check)) in cases.iter().enumerate() {
        std::fs::write(dir.join(format!("{i:02}.nib")), bytes).unwrap();
        let e = parse_err(bytes);
        assert!(check(&e), "case '{name}': unexpected error {e:?}");
        assert!(!e.to_string().is_empty());
    }
}

#[test]
fn flipped_data_byte_fails_checksum_not_parse() {
    let mut bytes = Raw::valid().build();
    let data_off = NibView::parse(&bytes).unwrap().tensors[1].offset as usize;
    bytes[data_off] ^= 0x40;
    let v = NibView::parse(&bytes).expect("data bytes are not validated at load");
    match v.verify_checksums() {
        Err(FormatError::ChecksumMismatch { name, .. }) => assert_eq!(name, "b.weight"),
        other => panic!("expected a checksum mismatch, got {other:?}"),
    }
}

/// Version 2 checksums the metadata section and the directory too: a
/// damaged byte there that still parses is caught by `verify_checksums`
/// (`nibble inspect --verify`), naming the section.
#[test]
fn damaged_sections_fail_their_checksums() {
    let good = Raw::valid().build();
    let v = NibView::parse(&good).unwrap();
    v.verify_checksums().unwrap();
    // A byte of the string "llama" in the metadata.
    let at = good.windows(5).position(|w| w == b"llama").unwrap();
    let mut bytes = good.clone();
    bytes[at] = b'L';
    let v = NibView::parse(&bytes).expect("still parses");
    match v.verify_checksums() {
        Err(FormatError::SectionChecksumMismatch { section, .. }) => {
            assert_eq!(section, "metadata section")
        }
        other => panic!("expected a metadata checksum error, got {other:?}"),
    }
    // A tensor's stored CRC in the directory (the directory is the tail).
    let mut bytes = good.clone();
    let n = bytes.len();
    bytes[n - 1] ^= 1;
    let v = NibView::parse(&bytes).expect("still parses");
    match v.verify_checksums() {
        Err(FormatError::SectionChecksumMismatch { section, .. }) => {
            assert_eq!(section, "tensor directory")
        }
        other => panic!("expected a directory checksum error, got {other:?}"),
    }
    // Wrong stored section checksums.
    let mut r = Raw::valid();
    r.crc_override = Some((1, 2));
    let bytes = r.build();
    assert!(matches!(
        NibView::parse(&bytes).unwrap().verify_checksums(),
        Err(FormatError::SectionChecksumMismatch { .. })
    ));
}

/// Files of format version 1 (no section checksums) still load and verify.
#[test]
fn version_1_files_still_load() {
    let bytes = Raw::valid_v1().build();
    let v = NibView::parse(&bytes).expect("version 1 parses");
    assert_eq!(v.version, 1);
    assert_eq!(v.tensors.len(), 2);
    v.verify_checksums().unwrap();
}

#[test]
fn error_messages_name_the_file() {
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"));
    let p = dir.join("bad-magic.nib");
    let mut r = Raw::valid();
    r.magic = *b"NOTANIB!";
    std::fs::write(&p, r.build()).unwrap();
    let e = nibble_format::NibFile::open(&p).err().expect("must fail");
    let msg = e.to_string();
    assert!(
        msg.contains("bad-magic.nib") && msg.contains("magic"),
        "{msg}"
    );
    let e = nibble_format::NibFile::open(dir.join("does-not-exist.nib"))
        .err()
        .unwrap();
    assert!(e.to_string().contains("does-not-exist.nib"), "{e}");
}

/// xorshift64* for the mutation test.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// Apply one random mutation: bit flips, byte sets, u64 splats, truncation.
fn mutate(rng: &mut Rng, good: &[u8]) -> Vec<u8> {
    let mut b = good.to_vec();
    for _ in 0..1 + rng.below(3) {
        match rng.below(5) {
            0 => {
                let i = rng.below(b.len().max(1));
                if let Some(x) = b.get_mut(i) {
                    *x ^= 1 << rng.below(8);
                }
            }
            1 => {
                let i = rng.below(b.len().max(1));
                if let Some(x) = b.get_mut(i) {
                    *x = rng.next() as u8;
                }
            }
            2 => {
                let i = rng.below(b.len().max(8));
                let v = match rng.below(4) {
                    0 => u64::MAX,
                    1 => rng.next(),
                    2 => rng.below(4096) as u64,
                    _ => 1 << rng.below(64),
                };
                for (k, byte) in v.to_le_bytes().iter().enumerate() {
                    if let Some(x) = b.get_mut(i + k) {
                        *x = *byte;
                    }
                }
            }
            3 => {
                let n = rng.below(b.len() + 1);
                b.truncate(n);
            }
            _ => {
                // Duplicate a random slice somewhere else.
                if b.len() > 16 {
                    let (s, d) = (rng.below(b.len() - 8), rng.below(b.len() - 8));
                    let chunk: Vec<u8> = b[s..s + 8].to_vec();
                    b[d..d + 8].copy_from_slice(&chunk);
                }
            }
        }
    }
    b
}

#[test]
fn mutation_test_100k_never_panics() {
    let good = Raw::valid().build();
    let mut rng = Rng(0x5EED_1234_ABCD_0001);
    let (mut ok, mut err) = (0u32, 0u32);
    for _ in 0..100_000 {
        let b = mutate(&mut rng, &good);
        match NibView::parse(&b) {
            Ok(v) => {
                ok += 1;
                // Everything a valid view hands out must be in bounds.
                let _ = v.verify_checksums();
                for t in &v.tensors {
                    assert_eq!(
                        Some(t.data.len() as u64),
                        nibble_format::dtype::tensor_bytes(t.dtype, &t.shape, t.quant_param)
                    );
                    assert_eq!(t.offset % 64, 0);
                }
            }
            Err(e) => {
                err += 1;
                assert!(!e.to_string().is_empty());
            }
        }
    }
    eprintln!("mutation test: {ok} mutants parsed, {err} rejected");
    assert_eq!(ok + err, 100_000);
    assert!(err > 50_000, "most mutations must be rejected (got {err})");
}
