//! Text ↔ tokens through the Hugging Face `tokenizers` crate, from the
//! `tokenizer.json` embedded in the model; incremental detokenization for
//! streaming; and chat-template rendering with minijinja.

use serde::Serialize;

use crate::error::{Result, RuntimeError};

pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
}

fn tk_err(e: tokenizers::Error) -> RuntimeError {
    RuntimeError::Tokenizer(e.to_string())
}

impl Tokenizer {
    pub fn from_bytes(json: &[u8]) -> Result<Tokenizer> {
        Ok(Tokenizer {
            inner: tokenizers::Tokenizer::from_bytes(json).map_err(tk_err)?,
        })
    }

    /// Encode text; `add_special` applies the tokenizer's post-processor
    /// (e.g. a leading BOS for Llama-2-style tokenizers).
    pub fn encode(&self, text: &str, add_special: bool) -> Result<Vec<u32>> {
        Ok(self
            .inner
            .encode(text, add_special)
            .map_err(tk_err)?
            .get_ids()
            .to_vec())
    }

    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String> {
        self.inner.decode(ids, skip_special).map_err(tk_err)
    }

    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }
}

/// Incremental detokenizer: turns a growing token list into text deltas,
/// holding back incomplete UTF-8 (byte-fallback tokens) and keeping the
/// decoder's context so spaces come out right.
#[derive(Default)]
pub struct TextStream {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl TextStream {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add one token; returns the new text it completes (possibly empty).
    pub fn push(&mut self, tok: &Tokenizer, id: u32) -> Result<String> {
        self.ids.push(id);
        let prefix = tok.decode(&self.ids[self.prefix_offset..self.read_offset], true)?;
        let full = tok.decode(&self.ids[self.prefix_offset..], true)?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && full.is_char_boundary(prefix.len())
        {
            let delta = full[prefix.len()..].to_string();
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            Ok(delta)
        } else {
            Ok(String::new())
        }
    }
}

/// One chat message.
#[derive(Clone, Debug, Serialize)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

/// Render a Hugging Face chat template (Jinja) for `messages`, ending with
/// the assistant's turn opened when `add_generation_prompt`.
pub fn render_chat(
    template: &str,
    messages: &[ChatMessage],
    add_generation_prompt: bool,
    bos_token: &str,
    eos_token: &str,
) -> Result<String> {
    let mut env = minijinja::Environment::new();
    env.add_function(
        "raise_exception",
        |msg: String| -> std::result::Result<String, minijinja::Error> {
            Err(minijinja::Error::new(
                minijinja::ErrorKind::InvalidOperation,
                msg,
            ))
        },
    );
    env.add_template("chat", template)?;
    let t = env.get_template("chat")?;
    Ok(t.render(minijinja::context! {
        messages => messages,
        add_generation_prompt => add_generation_prompt,
        bos_token => bos_token,
        eos_token => eos_token,
    })?)
}
