//! The C API from C: the examples in `examples/c` and the error-path program
//! `tests/c/errors.c` are compiled with the system C compiler against the
//! static library this very `cargo test` built, run on stories260k, and run
//! again under valgrind (memcheck: zero errors, zero definite or indirect
//! leaks).
//!
//! Only where the host runs what it builds (x86_64 Linux; the aarch64 cross
//! run under qemu has no native C toolchain to spawn).
#![cfg(all(target_arch = "x86_64", target_os = "linux"))]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::shared;
use nibble::format::import::{import_to_file, ImportOptions};
use nibble::format::DType;

/// The greedy story of stories260k (shared/README.md).
const STORY: &str =
    "Once upon a time, there was a little girl named Lily. She loved to play outside in the park";

/// A scratch folder of this test under cargo's target tmpdir.
fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("capi-{name}"));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// The static library cargo built for this test run: with staticlib among
/// the crate types, it sits beside the test executable in `deps/`.
fn static_lib() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let lib = exe.parent().expect("deps dir").join("libnibble.a");
    assert!(
        lib.is_file(),
        "{} not found: the root package must build a staticlib",
        lib.display()
    );
    lib
}

/// Compile `source` (relative to the repository) into `dir`.
fn compile(source: &str, dir: &Path) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join(source);
    let exe = dir.join(src.file_stem().expect("file name"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .args(["-std=c11", "-O1", "-g", "-Wall", "-Wextra", "-Werror"])
        .arg("-I")
        .arg(root.join("include"))
        .arg(&src)
        .arg(static_lib())
        // The list `cargo rustc --crate-type staticlib -- --print native-static-libs` gives.
        .args(["-lpthread", "-ldl", "-lm", "-lrt", "-lutil", "-lgcc_s"])
        .arg("-o")
        .arg(&exe)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C compiler {cc}: {e}"));
    assert!(
        out.status.success(),
        "{cc} {}: {}",
        src.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// stories260k as an F32 `.nib` in `dir`.
fn stories_nib(dir: &Path) -> PathBuf {
    let path = dir.join("stories260k.nib");
    let opts = ImportOptions {
        dtype: DType::F32,
        hash_source: false,
        keep_blocks: false,
        lora: Vec::new(),
    };
    import_to_file(
        &shared().join("models/stories260k"),
        &path,
        &opts,
        &mut |_, _, _| {},
    )
    .expect("convert stories260k");
    path
}

fn run(exe: &Path, args: &[&Path]) -> Output {
    Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", exe.display()))
}

/// Run under memcheck; fails on any memory error or definite/indirect leak.
/// valgrind has no AVX-512, so the kernels are forced to AVX2 there.
fn run_valgrind(exe: &Path, args: &[&Path]) -> Output {
    let out = Command::new("valgrind")
        .args([
            "--error-exitcode=99",
            "--leak-check=full",
            "--errors-for-leak-kinds=definite,indirect",
            "--show-leak-kinds=definite,indirect",
        ])
        .arg(exe)
        .args(args)
        .env("NIBBLE_ISA", "avx2")
        .output()
        .expect("valgrind is needed for this test (apt-get install valgrind; .ci/run installs it)");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && log.contains("ERROR SUMMARY: 0 errors"),
        "valgrind {} reports errors (exit {:?}):\n{log}",
        exe.display(),
        out.status.code()
    );
    out
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn c_example_streams_the_known_story() {
    let dir = scratch("generate");
    let model = stories_nib(&dir);
    let exe = compile("examples/c/generate.c", &dir);
    let prompt = PathBuf::from("Once upon a time");
    let max = PathBuf::from("40");
    let threads = PathBuf::from("1");
    let out = run(&exe, &[&model, &prompt, &max, &threads]);
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "generate failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.starts_with(STORY), "got: {text:?}");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(
        log.contains("generated 40 tokens") && log.contains("llama, F32"),
        "stderr: {log}"
    );

    // The same under valgrind: identical story, no errors, no leaks.
    let vg = run_valgrind(&exe, &[&model, &prompt, &max, &threads]);
    assert_eq!(
        stdout(&vg),
        text,
        "same output under valgrind (AVX2 kernels)"
    );
}

#[test]
fn readme_minimal_example_runs() {
    let dir = scratch("minimal");
    let model = stories_nib(&dir);
    let exe = compile("examples/c/minimal.c", &dir);
    let out = run_valgrind(&exe, &[&model]);
    let text = stdout(&out);
    let want = STORY.trim_start_matches("Once upon a time");
    assert!(text.starts_with(want), "got: {text:?}");
}

#[test]
fn c_error_paths_return_codes_and_messages() {
    let dir = scratch("errors");
    let model = stories_nib(&dir);
    // A corrupt file: the real model cut short inside its metadata.
    let bytes = std::fs::read(&model).expect("read model");
    let corrupt = dir.join("corrupt.nib");
    std::fs::write(&corrupt, &bytes[..3000]).expect("write corrupt file");
    let missing = dir.join("no-such-model.nib");
    let exe = compile("tests/c/errors.c", &dir);
    let args: [&Path; 3] = [&model, &corrupt, &missing];
    let out = run(&exe, &args);
    assert!(
        out.status.success(),
        "errors.c failed:\n{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    assert!(text.contains("checks passed"), "{text}");
    assert!(
        text.contains(&format!("I/O error on {}", missing.display())),
        "the missing file is named: {text}"
    );
    let vg = run_valgrind(&exe, &args);
    assert!(stdout(&vg).contains("checks passed"));
}

#[test]
fn lora_adapters_hot_swap_through_the_c_api() {
    let dir = scratch("lora");
    let model = stories_nib(&dir);
    let exe = compile("tests/c/lora.c", &dir);
    let lora = shared().join("fixtures/lora");
    let (max, tom) = (lora.join("max-r8"), lora.join("max-r4-qv"));
    let bad = shared().join("models/stories260k");
    let args: [&Path; 4] = [&model, &max, &tom, &bad];
    let out = run(&exe, &args);
    assert!(
        out.status.success(),
        "lora.c failed:\n{}{}",
        stdout(&out),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).contains("checks passed"), "{}", stdout(&out));
    // No errors, no leaks: adapters freed with their session.
    let vg = run_valgrind(&exe, &args);
    assert!(stdout(&vg).contains("checks passed"));
}
