//! A session: one conversation's run state (KV cache included) over a shared
//! model, plus generation with sampling, stop conditions and streaming.

use std::sync::Arc;

use crate::error::{Result, RuntimeError};
use crate::forward::{forward, forward_batch, BatchState, KvType, Par, RunState};
use crate::kernels::pool::SpinPool;
use crate::lora::{Attached, LoraRun};
use crate::model::Model;
use crate::sampler::Sampler;
use crate::tokenizer::TextStream;
use nibble_format::lora::LoraSpec;

/// Session settings.
#[derive(Clone, Debug)]
pub struct SessionParams {
    /// Context length in tokens (0 = the model's trained context, capped at
    /// 4096); at most the model's trained context.
    pub n_ctx: usize,
    /// Worker threads for the matrix-vector products (0 = one per physical
    /// core, [`crate::cpu::physical_cores`]). More than the logical CPUs
    /// this process may use are not started: they could only wait for each
    /// other ([`Session::n_threads`] says how many run).
    pub n_threads: usize,
    /// Prompt tokens evaluated together as matrix-matrix products (≥ 1).
    pub n_batch: usize,
    /// Thread pool of the per-token products (prompts always use rayon,
    /// through `gemm`).
    pub pool: PoolKind,
    /// How prompts multiply packed weights.
    pub prefill: PrefillKind,
    /// Element type of the KV cache (f16 by default; f32 for the reference
    /// arithmetic).
    pub kv: KvType,
}

/// How the batched (prompt) path multiplies packed weights.
///
/// All compute the same `Ŵ·x̂` (activations rounded through the int8
/// blocks of the one-token path) and differ only by float reassociation.
/// Measured on this project's AVX2 machine (`nibble bench --prefill
/// auto,tiles,int8`, docs/runtime-performance.md): the interleaved kernel is the
/// fastest, decoded tiles come next, the row-by-row int8 kernel last.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PrefillKind {
    /// 4-bit and GGUF Q5_0 weights with an interleaved copy
    /// ([`crate::Model::x8`]) through the interleaved int8 kernel;
    /// Q5_0/Q4_K/Q5_K/Q6_K weights without one through their batched
    /// kernels where the table has them (AVX2, AVX-512:
    /// `Kernels::matmul_gguf`); every other weight as `Int8` where the
    /// kernel table says its row-by-row kernel beats tiles (AVX-512 VNNI:
    /// `Kernels::qg_mm_beats_tiles`), else as `Tiles`.
    #[default]
    Auto,
    /// Rows decoded to f32 in tiles, multiplied by `gemm`.
    Tiles,
    /// Int8 activation blocks against the packed rows as stored
    /// ([`crate::kernels::qg_mm`], and the GGUF types' batched kernels), where
    /// the kernel table has such a kernel (AVX2, AVX-512); elsewhere the
    /// same as `Tiles`.
    Int8,
}

/// Which thread pool runs the per-token matrix-vector products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum PoolKind {
    /// A persistent spin/park pool ([`SpinPool`]): no allocation, no wake-up
    /// latency between the products of one token.
    #[default]
    Spin,
    /// rayon's work-stealing pool (kept to measure against).
    Rayon,
}

impl Default for SessionParams {
    fn default() -> Self {
        SessionParams {
            n_ctx: 0,
            n_threads: 0,
            n_batch: 128,
            pool: PoolKind::Spin,
            prefill: PrefillKind::Auto,
            kv: KvType::F16,
        }
    }
}

/// Why generation stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// An end-of-sequence token was produced (not emitted).
    Eos,
    /// A stop string appeared in the output (the text up to it was emitted).
    StopString,
    /// `max_tokens` were generated.
    MaxTokens,
    /// The context is full.
    ContextFull,
    /// The callback asked to stop.
    Callback,
}

/// Generation settings.
#[derive(Clone, Debug, Default)]
pub struct GenerateParams {
    pub max_tokens: usize,
    /// Stop when any of these strings appears in the generated text.
    pub stop_strings: Vec<String>,
    /// Also stop on the model's EOS tokens (default true via `new`).
    pub ignore_eos: bool,
}

/// What happened during a generation.
#[derive(Clone, Debug)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated_tokens: usize,
    pub prompt_seconds: f64,
    pub generate_seconds: f64,
    pub stop: StopReason,
    /// The generated text (stop string excluded).
    pub text: String,
    pub tokens: Vec<u32>,
}

pub struct Session {
    model: Arc<Model>,
    state: RunState,
    /// Tokens currently in the KV cache, in order (capacity n_ctx).
    tokens: Vec<u32>,
    pool: Option<rayon::ThreadPool>,
    /// The decode pool when `PoolKind::Spin` and more than one thread.
    spin: Option<SpinPool>,
    n_threads: usize,
    n_batch: usize,
    prefill: PrefillKind,
    /// Buffers of the batched prompt path, created on first use.
    batch: Option<BatchState>,
    /// Run-time LoRA adapters, in the order they were added.
    adapters: Vec<Attached>,
}

impl Session {
    /// Threads the per-token products run on.
    pub fn n_threads(&self) -> usize {
        self.n_threads
    }

    pub fn new(model: Arc<Model>, params: &SessionParams) -> Result<Session> {
        let n_ctx = if params.n_ctx == 0 {
            model.hparams.n_ctx_train.min(4096)
        } else {
            params.n_ctx
        };
        let trained = model.hparams.n_ctx_train;
        if trained > 0 && n_ctx > trained {
            return Err(RuntimeError::InvalidParam(format!(
                "a context of {n_ctx} tokens exceeds the model's {trained}"
            )));
        }
        // The KV cache at full context must fit in the memory there is.
        let hp = &model.hparams;
        let elem = match params.kv {
            KvType::F16 => 2u64,
            KvType::F32 => 4,
        };
        let kv_bytes = 2 * elem * (hp.n_layer * n_ctx * hp.n_head_kv * hp.head_dim) as u64;
        if let Some(avail) = crate::cpu::available_memory() {
            if kv_bytes > avail {
                return Err(RuntimeError::InvalidParam(format!(
                    "a context of {n_ctx} tokens needs {:.1} GB of KV cache, more than the {:.1} GB \
                     of memory available (lower the context)",
                    kv_bytes as f64 / 1e9,
                    avail as f64 / 1e9
                )));
            }
        }
        if n_ctx > 1 << 20 {
            return Err(RuntimeError::InvalidParam(format!(
                "a context of {n_ctx} tokens exceeds nibble's limit of {}",
                1 << 20
            )));
        }
        let n_threads = if params.n_threads == 0 {
            crate::cpu::physical_cores()
        } else {
            params.n_threads.min(crate::cpu::logical_cpus())
        };
        let pool = if n_threads > 1 {
            Some(
                rayon::ThreadPoolBuilder::new()
                    .num_threads(n_threads)
                    .build()?,
            )
        } else {
            None
        };
        if params.n_batch == 0 {
            return Err(RuntimeError::InvalidParam(
                "n_batch must be at least 1".into(),
            ));
        }
        let spin = if n_threads > 1 && params.pool == PoolKind::Spin {
            Some(SpinPool::new(n_threads).map_err(RuntimeError::Threads)?)
        } else {
            None
        };
        let state = RunState::with_kv(&model, n_ctx, params.kv);
        Ok(Session {
            model,
            state,
            tokens: Vec::with_capacity(n_ctx),
            pool,
            spin,
            n_threads,
            n_batch: params.n_batch.min(n_ctx),
            prefill: params.prefill,
            batch: None,
            adapters: Vec::new(),
        })
    }

    /// Attach the PEFT LoRA adapter `spec` (folder and scale) as `name`:
    /// every later token computes `W·x + Σ scale · alpha/r · B·(A·x)` for the
    /// layers it adapts, the base weights untouched. Checked against the
    /// model before anything changes. Tokens already in the KV cache keep
    /// what they were computed with (call [`Session::reset`] to recompute).
    pub fn add_lora(&mut self, name: &str, spec: &LoraSpec) -> Result<()> {
        if self.adapters.iter().any(|a| a.name == name) {
            return Err(RuntimeError::Lora(format!(
                "an adapter named '{name}' is already attached"
            )));
        }
        let attached = Attached::load(&self.model, name, spec)?;
        self.adapters.push(attached);
        self.rebuild_lora();
        Ok(())
    }

    /// Set adapter `name`'s scale (0 switches it off without removing it).
    pub fn set_lora_scale(&mut self, name: &str, scale: f32) -> Result<()> {
        if !scale.is_finite() {
            return Err(RuntimeError::InvalidParam(format!(
                "LoRA scale {scale} is not finite"
            )));
        }
        let a = self.adapter_mut(name)?;
        a.scale = scale;
        self.rebuild_lora();
        Ok(())
    }

    /// Detach adapter `name`.
    pub fn remove_lora(&mut self, name: &str) -> Result<()> {
        self.adapter_mut(name)?;
        self.adapters.retain(|a| a.name != name);
        self.rebuild_lora();
        Ok(())
    }

    /// The attached adapters: (name, scale, source folder and hash).
    pub fn loras(&self) -> impl Iterator<Item = (&str, f32, &str)> {
        self.adapters
            .iter()
            .map(|a| (a.name.as_str(), a.scale, a.source.as_str()))
    }

    fn adapter_mut(&mut self, name: &str) -> Result<&mut Attached> {
        self.adapters
            .iter_mut()
            .find(|a| a.name == name)
            .ok_or_else(|| RuntimeError::Lora(format!("no adapter named '{name}' is attached")))
    }

    /// The per-layer terms and their scratch, sized once per change.
    fn rebuild_lora(&mut self) {
        self.state.lora = LoraRun::build(&self.adapters, self.model.hparams.n_layer, self.n_batch);
    }

    pub fn model(&self) -> &Arc<Model> {
        &self.model
    }

    pub fn n_ctx(&self) -> usize {
        self.state.n_ctx
    }

    /// Tokens in the KV cache.
    pub fn tokens(&self) -> &[u32] {
        &self.tokens
    }

    /// Logits after the last evaluated token.
    pub fn logits(&self) -> &[f32] {
        &self.state.logits
    }

    /// Bytes of the run state (KV cache included).
    pub fn state_bytes(&self) -> usize {
        self.state.bytes()
    }

    /// Forget everything in the KV cache.
    pub fn reset(&mut self) {
        self.tokens.clear();
    }

    /// Keep only the first `n` tokens of the KV cache.
    pub fn truncate(&mut self, n: usize) {
        self.tokens.truncate(n);
    }

    fn check(&self, tokens: &[u32]) -> Result<()> {
        let needed = self.tokens.len() + tokens.len();
        if needed > self.state.n_ctx {
            return Err(RuntimeError::ContextOverflow {
                needed,
                n_ctx: self.state.n_ctx,
            });
        }
        let n_vocab = self.model.hparams.n_vocab;
        if let Some(&id) = tokens.iter().find(|&&t| t as usize >= n_vocab) {
            return Err(RuntimeError::BadToken { id, n_vocab });
        }
        Ok(())
    }

    fn step(&mut self, token: u32, want_logits: bool) {
        let pos = self.tokens.len();
        let (model, state) = (&*self.model, &mut self.state);
        match (&self.spin, &self.pool) {
            (Some(spin), _) => forward(model, state, token, pos, want_logits, Par::Spin(spin)),
            (None, Some(pool)) => {
                pool.install(|| forward(model, state, token, pos, want_logits, Par::Rayon))
            }
            (None, None) => forward(model, state, token, pos, want_logits, Par::Serial),
        }
        self.tokens.push(token);
    }

    /// Run one chunk of ≤ n_batch tokens through the batched path.
    fn step_batch(&mut self, chunk: &[u32], logits: Option<bool>) {
        let start = self.tokens.len();
        let (model, state, threads) = (&*self.model, &mut self.state, self.n_threads);
        let bs = self
            .batch
            .get_or_insert_with(|| BatchState::new(model, state, self.n_batch, self.prefill));
        match &self.pool {
            Some(pool) => {
                pool.install(|| forward_batch(model, state, bs, chunk, start, logits, threads))
            }
            None => forward_batch(model, state, bs, chunk, start, logits, 1),
        }
        self.tokens.extend_from_slice(chunk);
    }

    /// An error when `logits` (the rows after the tokens ending at cache
    /// position `pos`) hold a NaN or an infinity: damaged weights, which
    /// would otherwise print garbage with no error.
    fn check_logits(&self, logits: &[f32], pos: usize) -> Result<()> {
        if logits.iter().all(|v| v.is_finite()) {
            return Ok(());
        }
        Err(RuntimeError::NonFiniteLogits {
            model: self.model.name().to_string(),
            pos,
        })
    }

    /// Evaluate `tokens` after those already in the cache; returns the logits
    /// of the last one. One token takes the matrix-vector path and allocates
    /// nothing; several go through the batched path in chunks of n_batch.
    pub fn eval(&mut self, tokens: &[u32]) -> Result<&[f32]> {
        self.check(tokens)?;
        if tokens.len() == 1 {
            self.step(tokens[0], true);
        } else if !tokens.is_empty() {
            let n = tokens.len().div_ceil(self.n_batch);
            for (i, chunk) in tokens.chunks(self.n_batch).enumerate() {
                self.step_batch(chunk, if i + 1 == n { Some(false) } else { None });
            }
        }
        self.check_logits(&self.state.logits, self.tokens.len())?;
        Ok(&self.state.logits)
    }

    /// Evaluate `tokens` one at a time (matrix-vector path), returning the
    /// logits after each through `f(i, logits)`. Slow; for tests that compare
    /// the two paths.
    pub fn eval_each_sequential(
        &mut self,
        tokens: &[u32],
        mut f: impl FnMut(usize, &[f32]),
    ) -> Result<()> {
        self.check(tokens)?;
        for (i, &t) in tokens.iter().enumerate() {
            self.step(t, true);
            self.check_logits(&self.state.logits, self.tokens.len())?;
            f(i, &self.state.logits);
        }
        Ok(())
    }

    /// Evaluate `tokens`, calling `f(i, logits)` for each one, through the
    /// batched path.
    pub fn eval_each(&mut self, tokens: &[u32], mut f: impl FnMut(usize, &[f32])) -> Result<()> {
        let n_vocab = self.model.hparams.n_vocab;
        self.eval_batches(tokens, |first, logits| {
            for (i, row) in logits.chunks_exact(n_vocab).enumerate() {
                f(first + i, row);
            }
        })
    }

    /// Evaluate `tokens` through the batched path, one batch of up to
    /// `n_batch` tokens at a time, calling `f(first, logits)` after each:
    /// `first` is the index in `tokens` of the batch's first token and
    /// `logits` is `[batch len, n_vocab]`, row `i` the logits after token
    /// `first + i`. Perplexity uses this to score a batch's rows in parallel.
    pub fn eval_batches(&mut self, tokens: &[u32], mut f: impl FnMut(usize, &[f32])) -> Result<()> {
        self.check(tokens)?;
        let n_vocab = self.model.hparams.n_vocab;
        for (c, chunk) in tokens.chunks(self.n_batch).enumerate() {
            self.step_batch(chunk, Some(true));
            let logits = &self.batch.as_ref().expect("created by step_batch").logits;
            let logits = &logits[..chunk.len() * n_vocab];
            self.check_logits(logits, self.tokens.len())?;
            f(c * self.n_batch, logits);
        }
        Ok(())
    }

    /// Generate after `prompt`, streaming text deltas to `on_text(token, text)`;
    /// returning `false` from the callback stops generation.
    pub fn generate(
        &mut self,
        prompt: &[u32],
        params: &GenerateParams,
        sampler: &mut Sampler,
        mut on_text: impl FnMut(u32, &str) -> bool,
    ) -> Result<GenerationStats> {
        if prompt.is_empty() && self.tokens.is_empty() {
            return Err(RuntimeError::InvalidParam(
                "empty prompt: give at least one token (e.g. BOS)".into(),
            ));
        }
        let model = Arc::clone(&self.model);
        let tok = model.tokenizer().ok();
        let t0 = std::time::Instant::now();
        self.eval(prompt)?;
        let prompt_seconds = t0.elapsed().as_secs_f64();
        let t1 = std::time::Instant::now();
        let mut stream = TextStream::new();
        let mut text = String::new();
        let mut tokens = Vec::new();
        let max_stop = params
            .stop_strings
            .iter()
            .map(String::len)
            .max()
            .unwrap_or(0);
        let mut emitted = 0usize; // bytes of `text` already passed to on_text
        let stop = loop {
            if tokens.len() >= params.max_tokens {
                break StopReason::MaxTokens;
            }
            let next = sampler.sample(&self.state.logits, &self.tokens);
            if !params.ignore_eos && model.eos_ids.contains(&next) {
                break StopReason::Eos;
            }
            tokens.push(next);
            if let Some(tok) = tok {
                text.push_str(&stream.push(tok, next)?);
            }
            if let Some(cut) = params
                .stop_strings
                .iter()
                .filter_map(|s| text.find(s.as_str()))
                .min()
            {
                text.truncate(cut);
                if cut > emitted {
                    on_text(next, &text[emitted..]);
                }
                break StopReason::StopString;
            }
            // Hold back a tail that could still become a stop string.
            let mut safe = text.len().saturating_sub(max_stop.saturating_sub(1));
            while !text.is_char_boundary(safe) {
                safe -= 1;
            }
            let delta = if safe > emitted {
                &text[emitted..safe]
            } else {
                ""
            };
            let keep_going = on_text(next, delta);
            emitted = emitted.max(safe);
            if !keep_going {
                break StopReason::Callback;
            }
            if self.tokens.len() >= self.state.n_ctx {
                break StopReason::ContextFull;
            }
            self.eval(&[next])?;
        };
        if emitted < text.len() && stop != StopReason::StopString {
            on_text(*tokens.last().unwrap_or(&0), &text[emitted..]);
        }
        Ok(GenerationStats {
            prompt_tokens: prompt.len(),
            generated_tokens: tokens.len(),
            prompt_seconds,
            generate_seconds: t1.elapsed().as_secs_f64(),
            stop,
            text,
            tokens,
        })
    }
}
