//! The `nibble` binary end to end, on the real models in ../shared.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn shared() -> PathBuf {
    match std::env::var_os("NIBBLE_SHARED") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared"),
    }
}

/// Run the binary; under cross-testing `NIBBLE_TEST_RUNNER` (e.g.
/// `qemu-aarch64`) runs it, as cargo's target runner does for test binaries.
fn command() -> Command {
    let bin = env!("CARGO_BIN_EXE_nibble");
    match std::env::var("NIBBLE_TEST_RUNNER") {
        Ok(runner) if !runner.is_empty() => {
            let mut c = Command::new(runner);
            c.arg(bin);
            c
        }
        _ => Command::new(bin),
    }
}

fn nibble(args: &[&str]) -> Output {
    command().args(args).output().expect("run nibble")
}

fn ok(args: &[&str]) -> String {
    let o = nibble(args);
    assert!(
        o.status.success(),
        "nibble {args:?} failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout).unwrap()
}

/// As [`ok`], returning stderr (progress and summaries).
fn ok_stderr(args: &[&str]) -> String {
    let o = nibble(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(o.status.success(), "nibble {args:?} failed: {err}");
    err
}

fn fails(args: &[&str]) -> String {
    let o = nibble(args);
    assert_eq!(o.status.code(), Some(1), "nibble {args:?} should fail");
    let err = String::from_utf8(o.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    assert!(!err.contains("panicked"), "{err}");
    err
}

fn tmp(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn chat_answers_paris_from_the_gguf() {
    let gguf = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = ok(&[
        "chat",
        "-m",
        s(&gguf),
        "-p",
        "What is the capital of France?",
        "--temp",
        "0",
        "-t",
        "2",
        // The float weights: with the file's Q4_1 blocks and int8
        // activations the first token is a near-tie that goes the other way
        // (docs/correctness.md).
        "--dtype",
        "f32",
    ]);
    assert!(out.contains("Paris"), "answer: {out}");
}

#[test]
fn run_tells_the_stories260k_story() {
    let dir = shared().join("models/stories260k");
    let out = ok(&["run", "-m", s(&dir), "-n", "40", "--temp", "0"]);
    assert!(
        out.starts_with("Once upon a time, there was a little girl named Lily. She loved to play outside in the park"),
        "{out}"
    );
    // A prompt is echoed and continued.
    let out = ok(&[
        "run",
        "-m",
        s(&dir),
        "-p",
        "Once upon a time",
        "-n",
        "8",
        "--temp",
        "0",
    ]);
    assert!(
        out.starts_with("Once upon a time, there was a little girl"),
        "{out}"
    );
}

#[test]
fn convert_inspect_verify_and_run_from_nib() {
    let d = tmp("convert");
    let nib = d.join("stories.nib");
    let src = shared().join("models/stories260k");
    ok(&["convert", "-m", s(&src), "-o", s(&nib), "--dtype", "f32"]);
    let leftovers: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        leftovers,
        vec![std::ffi::OsString::from("stories.nib")],
        "no temp files left"
    );

    let info = ok(&["inspect", s(&nib), "--verify", "--tensors"]);
    assert!(
        info.contains("model.n_layer") && info.contains("blk.4.ffn_down.weight"),
        "{info}"
    );
    assert!(
        info.contains("metadata and directory checksums OK, all 47 tensor checksums OK"),
        "{info}"
    );
    assert!(info.contains("provenance.source_sha256"), "{info}");

    // The same text from the .nib as from the folder.
    let a = ok(&["run", "-m", s(&nib), "-n", "30", "--temp", "0"]);
    let b = ok(&["run", "-m", s(&src), "-n", "30", "--temp", "0"]);
    assert_eq!(a, b);

    // Corrupt one weight byte: loading still works, --verify catches it.
    let mut bytes = std::fs::read(&nib).unwrap();
    let n = bytes.len();
    bytes[n / 2] ^= 0x10;
    let bad = d.join("corrupt.nib");
    std::fs::write(&bad, &bytes).unwrap();
    ok(&["inspect", s(&bad)]);
    let err = fails(&["inspect", s(&bad), "--verify"]);
    assert!(
        err.contains("checksum mismatch") && err.contains("corrupt.nib"),
        "{err}"
    );
}

#[test]
fn convert_never_leaves_a_partial_file() {
    let d = tmp("convert-fail");
    let out = d.join("out.nib");
    // A source that fails halfway (unsupported architecture is caught early;
    // a missing shard file fails while reading).
    let src = d.join("broken");
    std::fs::create_dir_all(&src).unwrap();
    std::fs::copy(
        shared().join("models/stories260k/config.json"),
        src.join("config.json"),
    )
    .unwrap();
    std::fs::write(src.join("model.safetensors"), b"not safetensors").unwrap();
    let err = fails(&["convert", "-m", s(&src), "-o", s(&out)]);
    assert!(err.contains("model.safetensors"), "{err}");
    assert_eq!(
        std::fs::read_dir(&d).unwrap().count(),
        1,
        "only the source folder remains"
    );
}

#[test]
fn errors_name_the_file_and_the_problem() {
    let err = fails(&["run", "-m", "/nonexistent/model.gguf", "-p", "hi"]);
    assert!(err.contains("/nonexistent/model.gguf"), "{err}");

    let d = tmp("errors");
    let junk = d.join("junk.bin");
    std::fs::write(&junk, b"hello world, not a model").unwrap();
    let err = fails(&["run", "-m", s(&junk)]);
    assert!(
        err.contains("junk.bin") && err.contains("expected a .nib file"),
        "{err}"
    );

    let long = "Once upon a time ".repeat(200);
    let err = fails(&[
        "run",
        "-m",
        s(&shared().join("models/stories260k")),
        "-c",
        "64",
        "-p",
        &long,
    ]);
    assert!(err.contains("context"), "{err}");

    let err = fails(&[
        "run",
        "-m",
        s(&shared().join("models/stories260k")),
        "--top-p",
        "0",
    ]);
    assert!(err.contains("top_p"), "{err}");

    let err = fails(&["inspect", s(&junk)]);
    assert!(err.contains("junk.bin") && err.contains("magic"), "{err}");

    // GGUF output needs a GGUF source (its metadata and tokenizer) and fixes the grid.
    let stories = shared().join("models/stories260k");
    let out = d.join("o.gguf");
    let err = fails(&[
        "quantize",
        "-m",
        s(&stories),
        "-o",
        s(&out),
        "--gguf",
        "q4_0",
        "--method",
        "rtn",
    ]);
    assert!(
        err.contains("needs a GGUF source") && err.contains("stories260k"),
        "{err}"
    );
    let o = nibble(&[
        "quantize",
        "-m",
        s(&stories),
        "-o",
        s(&out),
        "--gguf",
        "q4_0",
        "--bits",
        "3",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.code() == Some(2) && err.contains("--bits"),
        "{err}"
    );
    let err = fails(&[
        "quantize",
        "-m",
        s(&stories),
        "-o",
        s(&out),
        "--method",
        "rtn",
        "--imatrix-out",
        s(&d.join("i.gguf")),
    ]);
    assert!(err.contains("--imatrix-out needs --method gptq"), "{err}");
    assert!(!out.exists() && !d.join("i.gguf").exists());
}

#[test]
fn perplexity_and_bench_report_numbers() {
    let dir = shared().join("models/stories260k");
    let text = shared().join("data/tinyshakespeare.txt");
    let out = ok(&[
        "perplexity",
        "-m",
        s(&dir),
        "-f",
        s(&text),
        "-c",
        "128",
        "--chunks",
        "4",
    ]);
    let ppl: f64 = out
        .split_whitespace()
        .nth(1)
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no number in {out}"));
    // A model must do better than uniform guessing over its 512 tokens.
    assert!(ppl.is_finite() && ppl > 1.0 && ppl < 512.0, "{out}");
    assert!(out.contains("508 predicted tokens"), "{out}");

    let out = ok(&[
        "bench",
        "-m",
        s(&dir),
        "-p",
        "16",
        "-n",
        "8",
        "-t",
        "1,2",
        "-r",
        "2",
        "--no-bandwidth",
    ]);
    for row in ["| 1 | pp16 |", "| 1 | tg8 |", "| 2 | pp16 |", "| 2 | tg8 |"] {
        assert!(out.contains(row), "{out}");
    }
}

#[test]
fn help_teaches() {
    let out = ok(&["--help"]);
    for cmd in ["convert", "run", "chat", "perplexity", "inspect", "bench"] {
        assert!(out.contains(cmd), "{out}");
    }
    let out = ok(&["run", "--help"]);
    assert!(
        out.contains("--temp") && out.contains("--top-p") && out.contains("--min-p"),
        "{out}"
    );
}

#[test]
fn quantize_writes_a_runnable_model_and_a_report() {
    let d = tmp("quantize");
    let out = d.join("st8.nib");
    let src = shared().join("models/stories260k");
    ok(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&out),
        "--method",
        "rtn",
        "--bits",
        "8",
        "--group-size",
        "32",
    ]);
    let report = std::fs::read_to_string(d.join("st8.nib.report.json")).unwrap();
    let r: serde_json::Value = serde_json::from_str(&report).unwrap();
    assert_eq!(r["layers"].as_array().unwrap().len(), 35);
    assert!(r["layers"][0]["rel_error"].as_f64().unwrap() < 1e-3);
    let info = ok(&["inspect", s(&out), "--verify"]);
    assert!(
        info.contains("Q8G") && info.contains("quant.method") && info.contains("\"rtn\""),
        "{info}"
    );
    let story = ok(&["run", "-m", s(&out), "-n", "30", "--temp", "0"]);
    assert!(
        story.starts_with("Once upon a time, there was a little girl named Lily."),
        "{story}"
    );
    // The free-minimum 4-bit grid is stored as Q4GM and runs.
    let fm = d.join("st4m.nib");
    ok(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&fm),
        "--method",
        "rtn",
        "--free-min",
        "--group-size",
        "32",
    ]);
    let info = ok(&["inspect", s(&fm), "--verify"]);
    assert!(info.contains("Q4GM"), "{info}");
    let story = ok(&["run", "-m", s(&fm), "-n", "8", "--temp", "0"]);
    assert!(story.starts_with("Once upon a time"), "{story}");

    // Bad settings fail before any work and leave nothing behind.
    let bad = d.join("bad.nib");
    let cases: [(&[&str], &[&str]); 9] = [
        (&["--bits", "5"], &["--bits 5"]),
        (&["--free-min", "--bits", "8"], &["--free-min", "--bits 8"]),
        (
            &["--free-min", "--group-size", "0"],
            &["--free-min", "--group-size 0"],
        ),
        (&["--group-size", "33"], &["multiple of 32"]),
        (&["--method", "rtn", "--calib", "self"], &["--calib"]),
        (
            &["--method", "rtn", "--no-true-sequential"],
            &["true-sequential"],
        ),
        (&["--method", "rtn", "--act-order"], &["act-order"]),
        (
            &["--static-groups", "--no-act-order"],
            &["--static-groups", "act-order"],
        ),
        (&["--seqlen", "1"], &["--seqlen"]),
    ];
    for (extra, wanted) in cases {
        let mut args = vec!["quantize", "-m", s(&src), "-o", s(&bad)];
        args.extend_from_slice(extra);
        let err = fails(&args);
        assert!(wanted.iter().all(|w| err.contains(w)), "{extra:?}: {err}");
    }
    let short = d.join("short.txt");
    std::fs::write(&short, "Once upon a time.").unwrap();
    let err = fails(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&bad),
        "--calib",
        s(&short),
        "--seqlen",
        "64",
    ]);
    assert!(
        err.contains("short.txt") && err.contains("fewer than one window"),
        "{err}"
    );
    assert!(!bad.exists());
}

#[test]
fn gptq_without_calibration_text_calibrates_on_the_models_own_text() {
    let d = tmp("gptq-self");
    let out = d.join("self4.nib");
    let src = shared().join("models/stories260k");
    let quantize = |out: &std::path::Path, extra: &[&str]| {
        let mut args = vec![
            "quantize",
            "-m",
            s(&src),
            "-o",
            s(out),
            "--bits",
            "4",
            "--group-size",
            "32",
            "--nsamples",
            "8",
            "--seqlen",
            "64",
            "-t",
            "2",
        ];
        args.extend_from_slice(extra);
        ok_stderr(&args)
    };
    let log = quantize(&out, &[]);
    assert!(log.contains("writes its own calibration text"), "{log}");
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("self4.nib.report.json")).unwrap())
            .unwrap();
    assert!(
        r["calib"].as_str().unwrap().starts_with("self-generated"),
        "{r}"
    );
    assert_eq!(r["calib_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(r["true_sequential"], true, "true-sequential is the default");
    assert_eq!(r["act_order"], true, "act-order is the default");
    for l in r["layers"].as_array().unwrap() {
        assert!(
            l["rel_error"].as_f64().unwrap() < l["rel_error_rtn"].as_f64().unwrap(),
            "{l}"
        );
    }
    let story = ok(&["run", "-m", s(&out), "-n", "30", "--temp", "0"]);
    assert!(story.starts_with("Once upon a time,"), "{story}");
    let info = ok(&["inspect", s(&out), "--tensors"]);
    assert!(
        info.contains("self-generated") && info.contains("blk.0.attn_q.perm"),
        "{info}"
    );

    // --no-act-order keeps the stored column order: no permutations.
    let plain = d.join("plain4.nib");
    quantize(&plain, &["--no-act-order"]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("plain4.nib.report.json")).unwrap())
            .unwrap();
    assert_eq!(r["act_order"], false);
    let info = ok(&["inspect", s(&plain), "--tensors"]);
    assert!(
        info.contains("blk.0.attn_q.weight") && !info.contains(".perm"),
        "{info}"
    );
}

#[test]
fn gptq_quantize_reports_gptq_beside_rtn_and_writes_an_imatrix() {
    let d = tmp("gptq");
    let out = d.join("st4.nib");
    let src = shared().join("models/stories260k");
    let calib = shared().join("data/tinyshakespeare.txt");
    ok(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&out),
        "--method",
        "gptq",
        "--bits",
        "4",
        "--group-size",
        "32",
        "--act-order",
        "--no-true-sequential",
        "--calib",
        s(&calib),
        "--nsamples",
        "8",
        "--seqlen",
        "64",
        "-t",
        "2",
        "--imatrix-out",
        s(&d.join("st4.imatrix.gguf")),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("st4.nib.report.json")).unwrap())
            .unwrap();
    let layers = r["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 35);
    // The importance matrix: llama.cpp's GGUF layout, every calibrated
    // weight, each input's sum of squares over the 8 × 64 tokens.
    let im = std::fs::read(d.join("st4.imatrix.gguf")).unwrap();
    let g = nibble_format::gguf::GgufFile::parse(&im).unwrap();
    assert_eq!(
        g.get("general.type").and_then(|v| v.as_str()),
        Some("imatrix")
    );
    assert_eq!(
        g.get("imatrix.chunk_count").and_then(|v| v.as_u64()),
        Some(8)
    );
    assert_eq!(g.tensors.len(), 2 * 35);
    let f32s = |b: &[u8]| -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    };
    let counts = g.tensor("blk.0.attn_q.weight.counts").unwrap();
    assert_eq!(f32s(counts.data), [512.0]);
    let sums = f32s(g.tensor("blk.0.attn_q.weight.in_sum2").unwrap().data);
    assert!(
        sums.len() == 64 && sums.iter().all(|v| v.is_finite() && *v > 0.0),
        "{sums:?}"
    );
    // q, k and v read the same input.
    let k = f32s(g.tensor("blk.0.attn_k.weight.in_sum2").unwrap().data);
    assert_eq!(sums, k);
    for l in layers {
        assert!(
            l["rel_error"].as_f64().unwrap() < l["rel_error_rtn"].as_f64().unwrap(),
            "{l}"
        );
    }
    assert!(r["seconds"]["hessian"].as_f64().is_some());
    assert_eq!(r["true_sequential"], false, "the last of the pair wins");
    let info = ok(&["inspect", s(&out), "--verify", "--tensors"]);
    assert!(
        info.contains("blk.0.attn_q.perm") && info.contains("quant.calib_sha256"),
        "{info}"
    );
    let story = ok(&["run", "-m", s(&out), "-n", "12", "--temp", "0"]);
    assert!(story.starts_with("Once upon a time"), "{story}");

    // That file as calibration (no text, no forward pass): GPTQ on the
    // diagonal Hessians, weighted search only; groups kept together.
    let from_im = d.join("st4-im.nib");
    let src = shared().join("models/stories260k");
    ok(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&from_im),
        "--group-size",
        "32",
        "--imatrix",
        s(&d.join("st4.imatrix.gguf")),
    ]);
    let r: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join("st4-im.nib.report.json")).unwrap())
            .unwrap();
    assert_eq!(r["layers"].as_array().unwrap().len(), 35);
    let info = ok(&["inspect", s(&from_im), "--tensors"]);
    assert!(!info.contains(".perm"), "{info}");
    let story = ok(&["run", "-m", s(&from_im), "-n", "12", "--temp", "0"]);
    assert!(story.starts_with("Once upon a time"), "{story}");
    // An importance matrix of another model, or not one at all: errors naming it.
    let err = fails(&[
        "quantize",
        "-m",
        s(&shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf")),
        "-o",
        s(&d.join("bad.gguf")),
        "--gguf",
        "q4_0",
        "--imatrix",
        s(&d.join("st4.imatrix.gguf")),
    ]);
    assert!(
        err.contains("st4.imatrix.gguf") && err.contains("inputs for"),
        "{err}"
    );
    let err = fails(&[
        "quantize",
        "-m",
        s(&src),
        "-o",
        s(&d.join("bad.nib")),
        "--imatrix",
        s(&out),
    ]);
    assert!(
        err.contains("importance matrix") && err.contains("st4.nib"),
        "{err}"
    );
    assert!(!d.join("bad.gguf").exists() && !d.join("bad.nib").exists());
}

/// `inspect` on a GGUF as downloaded: its metadata (arrays by length), every
/// tensor with its block type, a summary that counts them; `--verify` and a
/// truncated file are clear errors naming the file.
#[test]
fn inspect_reads_a_gguf_as_stored() {
    let gguf = shared().join(SMOLLM2);
    let info = ok(&["inspect", s(&gguf), "--tensors"]);
    for want in [
        "GGUF v3",
        "general.architecture",
        "\"llama\"",
        "tokenizer.ggml.tokens                    <array of 49152>",
        "token_embd.weight",
        "blk.29.ffn_down.weight",
        "Q4_1",
    ] {
        assert!(info.contains(want), "{want:?} missing from:\n{info}");
    }
    let listed = info
        .lines()
        .filter(|l| {
            l.starts_with("  blk.") || l.starts_with("  token_embd") || l.starts_with("  output")
        })
        .count();
    assert!(
        info.contains(&format!("summary: {listed} tensors")),
        "{listed} tensors listed:\n{info}"
    );

    let err = fails(&["inspect", s(&gguf), "--verify"]);
    assert!(
        err.contains("SmolLM2") && err.contains("no checksums"),
        "{err}"
    );

    let d = tmp("inspect-gguf");
    let cut = d.join("cut.gguf");
    let bytes = std::fs::read(&gguf).unwrap();
    std::fs::write(&cut, &bytes[..4096]).unwrap();
    let err = fails(&["inspect", s(&cut)]);
    assert!(
        err.contains("cut.gguf") && err.contains("not a valid GGUF"),
        "{err}"
    );
}

#[test]
fn interactive_chat_keeps_the_conversation() {
    use std::io::Write as _;
    let gguf = shared().join("models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let args = [
        "chat",
        "-m",
        s(&gguf),
        "--temp",
        "0",
        "-n",
        "24",
        "-t",
        "2",
        "--dtype",
        "f32",
    ];
    let mut child = command()
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"What is the capital of France?\nAnd of Italy?\n/exit\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let answers: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(answers.len() >= 2, "two answers expected: {text:?}");
    assert!(text.contains("Paris"), "{text}");
    assert!(
        text.contains("Rome"),
        "the second turn sees the first: {text}"
    );
}

// ---------------------------------------------------------------- hardening

const STORIES: &str = "models/stories260k";
const SMOLLM2: &str = "models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf";

/// Run with stdout piped, read `n` bytes, close the pipe, and return the exit.
fn close_stdout_after(args: &[&str], n: usize) -> Output {
    use std::io::Read;
    let mut child = command()
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn nibble");
    let mut buf = vec![0u8; n];
    child
        .stdout
        .take()
        .unwrap()
        .read_exact(&mut buf)
        .expect("some output first");
    // The read end is dropped here: later writes get EPIPE.
    child.wait_with_output().unwrap()
}

/// A reader that stops early (`| head -c 10`) ends the program quietly,
/// for every command that streams to stdout.
#[test]
fn a_closed_pipe_ends_quietly() {
    let story = shared().join(STORIES);
    let smol = shared().join(SMOLLM2);
    let cases: [Vec<&str>; 3] = [
        vec![
            "run",
            "-m",
            s(&story),
            "-p",
            "Once upon a time",
            "-n",
            "200",
            "--temp",
            "0",
            "--ignore-eos",
        ],
        vec![
            "chat",
            "-m",
            s(&smol),
            "-p",
            "Tell me a long story.",
            "-n",
            "64",
            "--temp",
            "0",
        ],
        vec![
            "bench",
            "-m",
            s(&story),
            "-p",
            "0",
            "-n",
            "4",
            "-r",
            "1",
            "--no-bandwidth",
            "-t",
            "1,1,1,1",
        ],
    ];
    for args in cases {
        let o = close_stdout_after(&args, 10);
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(!err.contains("panicked"), "{args:?}: {err}");
        assert_eq!(o.status.code(), Some(0), "{args:?}: {err}");
    }
}

/// Output to a full device is an error with exit status 1 (not a panic);
/// an unwritable stderr does not stop a conversion.
#[test]
fn a_full_device_is_an_error_not_a_panic() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        return;
    }
    let story = shared().join(STORIES);
    let d = tmp("dev-full");
    let text = d.join("text.txt");
    std::fs::write(&text, "Once upon a time there was a cat. ".repeat(40)).unwrap();
    for args in [
        vec![
            "run",
            "-m",
            s(&story),
            "-p",
            "Once",
            "-n",
            "8",
            "--temp",
            "0",
        ],
        vec!["perplexity", "-m", s(&story), "-f", s(&text), "-c", "64"],
    ] {
        let o = command()
            .args(&args)
            .stdout(std::fs::OpenOptions::new().write(true).open(full).unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "{args:?}: {err}");
        assert!(
            err.contains("cannot write to standard output") && !err.contains("panicked"),
            "{args:?}: {err}"
        );
    }
    let out = d.join("s.nib");
    let o = command()
        .args(["convert", "-m", s(&story), "-o", s(&out)])
        .stderr(std::fs::OpenOptions::new().write(true).open(full).unwrap())
        .output()
        .unwrap();
    assert!(
        o.status.success(),
        "convert with stderr on /dev/full failed"
    );
    assert!(out.is_file());
}

/// An output that is one of the inputs (the same inode, through a symlink
/// too), or that is not a regular file, is refused before any work, and
/// the input is left as it was.
#[test]
fn outputs_never_replace_inputs_or_non_files() {
    let d = tmp("out-is-in");
    let story = d.join("stories");
    std::fs::create_dir_all(&story).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        std::fs::copy(shared().join(STORIES).join(f), story.join(f)).unwrap();
    }
    let nib = d.join("s.nib");
    ok(&["convert", "-m", s(&story), "-o", s(&nib)]);
    let gguf = d.join("m.gguf");
    std::fs::copy(shared().join(SMOLLM2), &gguf).unwrap();
    let link = d.join("link.nib");
    std::os::unix::fs::symlink(&nib, &link).unwrap();
    let before = |p: &Path| std::fs::read(p).unwrap();
    let (nib0, st0, gguf0) = (
        before(&nib),
        before(&story.join("model.safetensors")),
        before(&gguf),
    );
    let st = story.join("model.safetensors");
    for args in [
        vec!["quantize", "-m", s(&nib), "-o", s(&nib), "--method", "rtn"],
        vec!["quantize", "-m", s(&nib), "-o", s(&link), "--method", "rtn"],
        vec!["convert", "-m", s(&story), "-o", s(&st)],
        vec![
            "convert",
            "-m",
            s(&gguf),
            "-o",
            s(&gguf),
            "--dtype",
            "native",
        ],
    ] {
        let err = fails(&args);
        assert!(err.contains("would destroy the source"), "{args:?}: {err}");
    }
    assert!(before(&nib) == nib0 && before(&st) == st0 && before(&gguf) == gguf0);
    // A folder or a device as the output.
    let err = fails(&["convert", "-m", s(&story), "-o", s(&d)]);
    assert!(err.contains("a directory"), "{err}");
    if Path::new("/dev/full").exists() {
        let err = fails(&["convert", "-m", s(&story), "-o", "/dev/full"]);
        assert!(
            err.contains("a device") && err.contains("/dev/full"),
            "{err}"
        );
    }
}

/// SIGINT / SIGTERM in the middle of a conversion or a quantization leaves
/// nothing behind (no temp file, no partial output).
#[test]
fn signals_leave_no_debris() {
    let d = tmp("signals");
    let smol = shared().join(SMOLLM2);
    for (sig, cmd) in [
        ("TERM", "convert"),
        ("INT", "convert"),
        ("TERM", "quantize"),
    ] {
        let out = d.join(format!("{cmd}-{sig}.nib"));
        let mut args = vec![cmd, "-m", s(&smol), "-o", s(&out)];
        if cmd == "quantize" {
            args.extend(["--method", "gptq", "--nsamples", "64", "--seqlen", "256"]);
        } else {
            // Decoding every weight to f32 takes a few times longer than
            // keeping the blocks (~0.6 s here): the signal lands mid-work.
            args.extend(["--dtype", "f32"]);
        }
        let mut child = command()
            .args(&args)
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(std::time::Duration::from_millis(700));
        if child.try_wait().unwrap().is_some() {
            // Finished before the signal: nothing to test on this machine.
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(d.join(format!("{cmd}-{sig}.nib.report.json")));
            continue;
        }
        let status = Command::new("kill")
            .args([format!("-{sig}"), child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        if child.wait().unwrap().success() {
            // The signal came after the work was done (the output was already
            // complete and in place): nothing to test this time.
            let _ = std::fs::remove_file(&out);
            let _ = std::fs::remove_file(d.join(format!("{cmd}-{sig}.nib.report.json")));
            continue;
        }
        let left: Vec<_> = std::fs::read_dir(&d)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert!(left.is_empty(), "{cmd} after SIG{sig}: {left:?}");
    }
}

/// A damaged norm weight (NaN) stops `run` and `perplexity` with an error
/// that points at `inspect --verify`, which names the damage; a damaged
/// metadata byte is caught by `inspect --verify` too.
#[test]
fn damaged_weights_and_metadata_are_errors() {
    let d = tmp("damaged");
    let nib = d.join("s.nib");
    ok(&["convert", "-m", s(&shared().join(STORIES)), "-o", s(&nib)]);
    let good = std::fs::read(&nib).unwrap();
    let v = nibble_format::NibView::parse(&good).unwrap();
    let t = v.tensor("blk.0.attn_norm.weight").unwrap();
    let at = t.offset as usize;
    let mut bytes = good.clone();
    bytes[at..at + 4].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = d.join("nan.nib");
    std::fs::write(&bad, &bytes).unwrap();
    let text = d.join("t.txt");
    std::fs::write(&text, "Once upon a time there was a cat. ".repeat(40)).unwrap();
    for args in [
        vec!["run", "-m", s(&bad), "-p", "Once", "-n", "8", "--temp", "0"],
        vec!["perplexity", "-m", s(&bad), "-f", s(&text), "-c", "64"],
    ] {
        let err = fails(&args);
        assert!(
            err.contains("non-finite logits") && err.contains("inspect --verify"),
            "{args:?}: {err}"
        );
    }
    let err = fails(&["inspect", s(&bad), "--verify"]);
    assert!(err.contains("blk.0.attn_norm.weight"), "{err}");
    // One byte of the source path in the metadata: still parses, fails --verify.
    let name = b"stories260k";
    let at = good.windows(name.len()).position(|w| w == name).unwrap();
    let mut bytes = good;
    bytes[at] = b'S';
    let bad = d.join("meta.nib");
    std::fs::write(&bad, &bytes).unwrap();
    ok(&["inspect", s(&bad)]);
    let err = fails(&["inspect", s(&bad), "--verify"]);
    assert!(err.contains("metadata section"), "{err}");
}

/// Lengths beyond the model are refused before any work, saying the limit;
/// perplexity's default window is the model's context.
#[test]
fn lengths_beyond_the_model_are_refused() {
    let story = shared().join(STORIES);
    let d = tmp("lengths");
    let out = d.join("q.nib");
    let text = d.join("t.txt");
    std::fs::write(&text, "Once upon a time there was a cat. ".repeat(200)).unwrap();
    for (args, want) in [
        (
            vec![
                "quantize",
                "-m",
                s(&story),
                "-o",
                s(&out),
                "--seqlen",
                "100000",
            ],
            "--seqlen 100000 exceeds the context",
        ),
        (
            vec!["bench", "-m", s(&story), "-p", "100000", "-n", "0"],
            "(512 tokens)",
        ),
        (
            vec!["bench", "-m", s(&story), "-p", "0", "-n", "100000"],
            "(512 tokens)",
        ),
        (
            vec!["run", "-m", s(&story), "-c", "100000", "-p", "Once"],
            "exceeds the model's 512",
        ),
        (
            vec!["perplexity", "-m", s(&story), "-f", s(&text), "-c", "1"],
            "at least 2 tokens",
        ),
    ] {
        let err = fails(&args);
        assert!(err.contains(want), "{args:?}: {err}");
    }
    assert!(!out.exists());
    let o = ok(&["perplexity", "-m", s(&story), "-f", s(&text)]);
    assert!(o.contains("windows of 512"), "{o}");
}

/// A folder whose tokenizer.json does not load is refused before anything
/// is written.
#[test]
fn an_invalid_tokenizer_is_refused_at_convert() {
    let d = tmp("bad-tokenizer");
    let src = d.join("stories");
    std::fs::create_dir_all(&src).unwrap();
    for f in ["config.json", "model.safetensors"] {
        std::fs::copy(shared().join(STORIES).join(f), src.join(f)).unwrap();
    }
    std::fs::write(
        src.join("tokenizer.json"),
        br#"{"model": {"type": "nonsense"}}"#,
    )
    .unwrap();
    let out = d.join("s.nib");
    let err = fails(&["convert", "-m", s(&src), "-o", s(&out)]);
    assert!(
        err.contains("tokenizer.json") && err.contains("does not load"),
        "{err}"
    );
    assert!(!out.exists());
}

/// Messages say what is wrong: a folder given to `inspect`, a file that is
/// no model (its first bytes shown), a folder without config.json, a GGUF
/// without a tokenizer beside it, an empty stop string, contradictory
/// flags, binary text on chat's standard input.
#[test]
fn messages_say_what_is_wrong() {
    let d = tmp("messages");
    let err = fails(&["inspect", s(&d)]);
    assert!(
        err.contains("is a folder") || err.contains("a folder, not a .nib"),
        "{err}"
    );
    let junk = d.join("junk.nib");
    std::fs::write(&junk, b"hello world").unwrap();
    let err = fails(&["run", "-m", s(&junk), "-p", "x"]);
    assert!(
        err.contains("68 65 6c 6c 6f") && err.contains("GGUF"),
        "{err}"
    );
    let empty = d.join("empty.gguf");
    std::fs::write(&empty, b"").unwrap();
    let err = fails(&["run", "-m", s(&empty), "-p", "x"]);
    assert!(err.contains("empty"), "{err}");
    let folder = d.join("no-config");
    std::fs::create_dir_all(&folder).unwrap();
    let err = fails(&["run", "-m", s(&folder), "-p", "x"]);
    assert!(
        err.contains("no config.json") && !err.contains("metadata key"),
        "{err}"
    );
    // A GGUF alone (no tokenizer.json beside it) runs from its own
    // metadata, named directly or as the folder that holds it.
    let alone = d.join("alone");
    std::fs::create_dir_all(&alone).unwrap();
    let gguf = alone.join("alone.gguf");
    std::fs::copy(shared().join(SMOLLM2), &gguf).unwrap();
    for m in [&gguf, &alone] {
        let o = nibble(&[
            "run",
            "-m",
            s(m),
            "-p",
            "The sky is",
            "-n",
            "4",
            "--temp",
            "0",
        ]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("generation: 4 tokens"), "timing line: {err}");
    }
    std::fs::copy(shared().join(SMOLLM2), alone.join("second.gguf")).unwrap();
    let err = fails(&["run", "-m", s(&alone), "-p", "x"]);
    assert!(
        err.contains("several GGUF files") && err.contains("second.gguf"),
        "{err}"
    );
    let story = shared().join(STORIES);
    let o = nibble(&["run", "-m", s(&story), "-p", "x", "--stop", ""]);
    assert_eq!(o.status.code(), Some(2), "clap rejects an empty --stop");
    assert!(String::from_utf8_lossy(&o.stderr).contains("empty stop string"));
    let o = nibble(&[
        "quantize",
        "-m",
        s(&story),
        "-o",
        "x.nib",
        "--act-order",
        "--no-act-order",
    ]);
    assert_eq!(o.status.code(), Some(2), "contradictory flags are refused");
    let chat = command()
        .args(["chat", "-m", s(&shared().join(SMOLLM2))])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = chat.stdin.as_ref().unwrap();
        stdin.write_all(&[0xff, 0xfe, 0x00, 0x80, b'\n']).unwrap();
    }
    let o = chat.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("standard input"), "{err}");
}

/// More threads than CPUs: a warning, and the run goes on at the CPU count
/// (it used to spin for minutes with `-t 1000`).
#[test]
fn oversubscription_warns_and_runs() {
    let story = shared().join(STORIES);
    let o = nibble(&[
        "run",
        "-m",
        s(&story),
        "-p",
        "Once",
        "-n",
        "8",
        "--temp",
        "0",
        "-t",
        "1000",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("warning: -t 1000 exceeds"), "{err}");
}

/// A file fetched by `../shared/scripts/fetch-models.sh` (`$NIBBLE_MODELS`,
/// else `~/.cache/nibble/models`).
fn real_model(file: &str) -> PathBuf {
    let dir = match std::env::var_os("NIBBLE_MODELS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(std::env::var_os("HOME").expect("HOME")).join(".cache/nibble/models"),
    };
    let p = dir.join(file);
    assert!(
        p.is_file(),
        "{} is missing: run ../shared/scripts/fetch-models.sh",
        p.display()
    );
    p
}

/// `perplexity --protocol llama.cpp` computes what llama-perplexity does:
/// after 4 windows of 512 of wikitext-2, within 1 % of llama.cpp's running
/// value there (`fixtures/gguf-reference/llamacpp_results.json`), for the
/// SentencePiece model that adds BOS (Gemma 3) and the BPE one that does
/// not (Qwen2.5). The full 20 windows: docs/BENCHMARKS.md.
#[test]
#[cfg_attr(
    target_arch = "aarch64",
    ignore = "minutes of model arithmetic under qemu"
)]
fn perplexity_llama_cpp_protocol_matches_llama_perplexity() {
    let results: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(shared().join("fixtures/gguf-reference/llamacpp_results.json"))
            .unwrap(),
    )
    .unwrap();
    let text = shared().join("data/wikitext-2-test.txt");
    for (key, file) in [
        ("gemma-3-270m", "gemma-3-270m-q4_k_m.gguf"),
        (
            "qwen2.5-coder-0.5b",
            "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        ),
    ] {
        let want = results["models"][key]["perplexity_c512_chunks20"]["running"][3]
            .as_f64()
            .unwrap();
        let out = ok(&[
            "perplexity",
            "-m",
            s(&real_model(file)),
            "-f",
            s(&text),
            "-c",
            "512",
            "--chunks",
            "4",
            "--protocol",
            "llama.cpp",
            "-t",
            "2",
        ]);
        assert!(out.contains("over 1020 predicted tokens"), "{out}");
        let ppl: f64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no number in {out}"));
        let rel = (ppl / want - 1.0).abs();
        eprintln!(
            "{key}: nibble {ppl:.4}, llama.cpp {want:.4} ({:+.2} %)",
            100.0 * (ppl / want - 1.0)
        );
        assert!(rel < 0.01, "{key}: {ppl} vs llama.cpp {want}");
    }
}
