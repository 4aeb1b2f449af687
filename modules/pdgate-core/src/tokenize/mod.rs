//! A request body to the prompt token ids vLLM computes for it.
//!
//! The proxy loads a model directory once, at configuration time
//! ([`Model::load`]), and per request turns an OpenAI body into the token ids
//! of its prompt ([`Model::prompt_tokens`]), for token counts and for vLLM's
//! prefix block hashes. Nothing here knows nginx; a [`Model`] is `Send + Sync`
//! and a request only borrows it.
//!
//! # What is reproduced
//!
//! - **Files.** `tokenizer.json` (HF `tokenizers`, its truncation and
//!   padding switched off as transformers does); `tokenizer_config.json`
//!   (chat template, special tokens, `add_bos_token`/`add_eos_token` for the
//!   Llama/Gemma classes); `chat_template.jinja`, then a processor's
//!   `chat_template.json`, before the config's template.
//! - **Chat** (`messages`): vLLM's message parsing (`request.rs`), its content
//!   format detection (`source.rs`), then transformers' `apply_chat_template`
//!   (`template.rs`): variables `messages`, `tools`, `documents`,
//!   `add_generation_prompt`, the special tokens (`bos_token`...), and the
//!   `chat_template_kwargs` (which may also override `add_generation_prompt`,
//!   `continue_final_message`, `tools`, `documents`);
//!   `continue_final_message` cuts the prompt after the final message as
//!   transformers does. The text is then encoded with
//!   `add_special_tokens` from the request (default false: the template
//!   already wrote BOS).
//! - **Completions** (`prompt`): a string encoded with `add_special_tokens`
//!   (default true); token ids used as they are (checked against the
//!   vocabulary). For a batch (a list of strings or of id lists) the **first**
//!   prompt is used: the proxy routes a request as one unit.
//! - `truncate_prompt_tokens: k` keeps the last `k` tokens, as vLLM does.
//! - Special-token text inside messages or prompts encodes as the special
//!   token (neither vLLM nor transformers' default escapes it).
//!
//! # What is not
//!
//! - Multimodal content parts (images, audio, video, embeddings): vLLM
//!   expands their placeholders into model-specific token runs in its
//!   multimodal processor; such requests get [`PromptError::Unsupported`].
//! - Models vLLM does not render with the HF template: Mistral's
//!   `mistral_common` tokenizers, harmony (gpt-oss), and the models with
//!   their own renderers (DeepSeek V3.2/V4, Kimi, Grok 2...).
//! - Server options we do not see: `--chat-template` (the model directory's
//!   template is used), `--chat-template-content-format` (see
//!   [`Model::set_content_format`]), `--exclude-tools-when-tool-choice-none`;
//!   per-request `chat_template` is refused, `reasoning_effort` is not passed.
//! - `continue_final_message` follows transformers (the prompt stops inside
//!   the final message); with `add_generation_prompt` also true the request
//!   is refused, as vLLM refuses it.
//! - Tool calls: vLLM's input-side handling is reproduced (arguments parsed,
//!   empty lists dropped); the Mistral-only tool-call id rewriting is not,
//!   and `tool_calls` items keep the client's keys and order (pydantic would
//!   reorder them; templates read their fields, not their order).
//! - `strftime_now` uses UTC (transformers uses the server's local time).
//! - Dicts created by the template itself (`{'a': 1}`) iterate in key order,
//!   not insertion order (minijinja without `preserve_order`); request data
//!   keeps its order. `~` and `|string` print floats the Rust way. Python
//!   string methods are those of `minijinja_contrib::pycompat`; integers
//!   beyond i128 become floats.
//! - `truncate_prompt_tokens: -1` (the model's maximum length) is ignored.
//! - A hostile chat template is bounded in output size, `range()` use and
//!   recursion depth, not in CPU time as such (see `template.rs`; minijinja's
//!   `fuel` feature would close that).

mod config;
mod pyfmt;
mod request;
mod source;
mod template;
pub mod testing;
mod value;

#[cfg(test)]
mod tests;

use std::fmt;
use std::path::{Path, PathBuf};

use minijinja::value::Value;
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::Tokenizer;

use self::request::{ChatRequest, Prompt, Request, CONTINUE_TAG};
pub use self::source::ContentFormat;
use self::template::{RenderError, Templates};
pub use self::template::{OUTPUT_PER_BODY_BYTE, OUTPUT_SLACK, RANGE_BUDGET};
use self::value::JsonMap;
use crate::json::JsonError;

/// A loaded model directory: tokenizer and chat template.
pub struct Model {
    tokenizer: Tokenizer,
    templates: Option<Templates>,
    /// transformers' `special_tokens_map`, passed to the template.
    special_tokens: Vec<(&'static str, Value)>,
    bos_token: Option<String>,
    eos_token: Option<String>,
    vocab_size: usize,
    /// The largest id in the vocabulary (ids may have gaps).
    max_token_id: u32,
}

impl fmt::Debug for Model {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Model")
            .field("vocab_size", &self.vocab_size)
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("content_format", &self.content_format(false))
            .finish_non_exhaustive()
    }
}

const _: () = {
    const fn send_sync<T: Send + Sync>() {}
    send_sync::<Model>();
};

/// Why a model directory cannot be used: the file and the problem, one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub path: PathBuf,
    pub problem: String,
}

impl fmt::Display for LoadError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "\"{}\": {}", self.path.display(), self.problem)
    }
}

impl std::error::Error for LoadError {}

/// Why a request has no prompt tokens; `Display` is meant for the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PromptError {
    /// The body is not a JSON object.
    Json(JsonError),
    /// Neither `messages` nor `prompt`.
    NoPrompt,
    /// A field has the wrong shape (`messages[2].role is missing`).
    Invalid(String),
    /// Valid for vLLM, but not something we can tokenize (multimodal parts,
    /// a per-request chat template, prompt embeddings).
    Unsupported(String),
    /// A chat request for a model without a chat template.
    NoChatTemplate,
    /// The template called `raise_exception` (e.g. roles not alternating).
    Rejected(String),
    /// Any other template failure.
    Template(String),
    /// The rendered prompt passed the output bound ([`OUTPUT_PER_BODY_BYTE`]
    /// times the body size plus [`OUTPUT_SLACK`]).
    TooLarge { limit: usize },
    /// The tokenizer failed.
    Tokenizer(String),
}

impl fmt::Display for PromptError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PromptError::Json(e) => e.fmt(f),
            PromptError::NoPrompt => f.write_str("request has neither \"messages\" nor \"prompt\""),
            PromptError::Invalid(m) => f.write_str(m),
            PromptError::Unsupported(m) => write!(f, "not supported: {m}"),
            PromptError::NoChatTemplate => f.write_str("the model has no chat template"),
            PromptError::Rejected(m) => write!(f, "the chat template rejected the request: {m}"),
            PromptError::Template(m) => write!(f, "chat template error: {m}"),
            PromptError::TooLarge { limit } => {
                write!(f, "the rendered chat prompt is larger than {limit} bytes")
            }
            PromptError::Tokenizer(m) => write!(f, "tokenizer error: {m}"),
        }
    }
}

impl std::error::Error for PromptError {}

/// Reads a file of the model directory; `None` when it does not exist.
fn read(path: &Path) -> Result<Option<Vec<u8>>, LoadError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(LoadError { path: path.to_owned(), problem: format!("cannot read: {e}") }),
    }
}

impl Model {
    /// Loads `dir`: `tokenizer.json` (required), `tokenizer_config.json`,
    /// `chat_template.jinja` and `chat_template.json` (optional). Templates
    /// are compiled here, once.
    pub fn load(dir: &Path) -> Result<Model, LoadError> {
        let err = |path: &Path, problem: String| LoadError { path: path.to_owned(), problem };

        let tok_path = dir.join("tokenizer.json");
        let bytes = read(&tok_path)?
            .ok_or_else(|| err(&tok_path, "cannot read: no such file".to_owned()))?;
        let mut tokenizer =
            Tokenizer::from_bytes(&bytes).map_err(|e| err(&tok_path, one_line(&*e)))?;
        drop(bytes);
        // transformers encodes without the file's truncation and padding.
        tokenizer.with_truncation(None).map_err(|e| err(&tok_path, one_line(&*e)))?;
        tokenizer.with_padding(None);

        let cfg_path = dir.join("tokenizer_config.json");
        let cfg = match read(&cfg_path)? {
            Some(text) => config::parse(&text).map_err(|e| err(&cfg_path, e))?,
            None => config::TokenizerConfig::default(),
        };

        if let Some((add_bos, add_eos)) = cfg.flag_post_processor() {
            let processor = flag_post_processor(&tokenizer, &cfg, add_bos, add_eos)
                .map_err(|e| err(&cfg_path, e))?;
            tokenizer.with_post_processor(Some(processor));
        }

        // Where the chat template comes from, newest layout first.
        let jinja_path = dir.join("chat_template.jinja");
        let json_path = dir.join("chat_template.json");
        let mut default = None;
        if let Some(text) = read(&jinja_path)? {
            let text = String::from_utf8(text).map_err(|e| err(&jinja_path, e.to_string()))?;
            default = Some((jinja_path, text));
        } else if let Some(text) = read(&json_path)? {
            if let Some(t) =
                config::parse_chat_template_json(&text).map_err(|e| err(&json_path, e))?
            {
                default = Some((json_path, t));
            }
        }
        if default.is_none() {
            default = cfg.chat_template.clone().map(|t| (cfg_path.clone(), t));
        }
        let templates = match default {
            Some((path, src)) => Some(
                Templates::compile(&src, cfg.tool_use_template.as_deref())
                    .map_err(|e| err(&path, format!("chat template: {e}")))?,
            ),
            None => None,
        };

        Ok(Model {
            vocab_size: tokenizer.get_vocab_size(true),
            max_token_id: tokenizer.get_vocab(true).into_values().max().unwrap_or(0),
            tokenizer,
            templates,
            special_tokens: cfg.special_tokens,
            bos_token: cfg.bos_token,
            eos_token: cfg.eos_token,
        })
    }

    /// The prompt token ids vLLM computes for an OpenAI request body: a chat
    /// request when it has `messages`, a completions request when it has
    /// `prompt`.
    pub fn prompt_tokens(&self, body: &[u8]) -> Result<Vec<u32>, PromptError> {
        match request::parse(body)? {
            Request::Chat(chat) => {
                let text = self.render(&chat, body.len())?;
                let ids = self.encode(&text, chat.add_special_tokens)?;
                Ok(keep_last(ids, chat.truncate))
            }
            Request::Completion(c) => {
                let ids = match c.prompt {
                    Prompt::Text(text) => self.encode(&text, c.add_special_tokens)?,
                    Prompt::Ids(ids) => {
                        if let Some(bad) = ids.iter().find(|&&id| id > self.max_token_id) {
                            return Err(PromptError::Invalid(format!(
                                "prompt token id {bad} is out of vocabulary"
                            )));
                        }
                        ids
                    }
                };
                Ok(keep_last(ids, c.truncate))
            }
        }
    }

    /// The rendered chat prompt of a body with `messages` (what
    /// [`Model::prompt_tokens`] encodes).
    pub fn chat_prompt(&self, body: &[u8]) -> Result<String, PromptError> {
        match request::parse(body)? {
            Request::Chat(chat) => self.render(&chat, body.len()),
            Request::Completion(_) => {
                Err(PromptError::Invalid("the request has no messages".into()))
            }
        }
    }

    /// Token ids of `text`; `add_special_tokens` runs the tokenizer's
    /// post-processor (BOS/EOS as the model defines them).
    pub fn encode(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, PromptError> {
        let enc = self
            .tokenizer
            .encode_fast(text, add_special_tokens)
            .map_err(|e| PromptError::Tokenizer(one_line(&*e)))?;
        Ok(enc.get_ids().to_vec())
    }

    /// How many tokens `text` is on its own (no special tokens added).
    pub fn count(&self, text: &str) -> Result<usize, PromptError> {
        self.encode(text, false).map(|ids| ids.len())
    }

    /// The id of a token (a special token's text, or a vocabulary entry).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    pub fn has_chat_template(&self) -> bool {
        self.templates.is_some()
    }

    /// The content format chat requests use with `tools` present or not
    /// (detected from the template, as vLLM's `"auto"` does).
    pub fn content_format(&self, with_tools: bool) -> Option<ContentFormat> {
        self.templates.as_ref().map(|t| t.pick(with_tools).format)
    }

    /// Overrides the detected content format, like vLLM's
    /// `--chat-template-content-format string|openai`.
    pub fn set_content_format(&mut self, format: ContentFormat) {
        if let Some(t) = &mut self.templates {
            t.set_format(format);
        }
    }

    fn render(&self, chat: &ChatRequest, body_len: usize) -> Result<String, PromptError> {
        let templates = self.templates.as_ref().ok_or(PromptError::NoChatTemplate)?;
        let info = templates.pick(chat.has_tools());
        if chat.continue_final_message && !info.mentions_content {
            return Err(PromptError::Invalid(
                "continue_final_message is set but the chat template never uses \"content\"".into(),
            ));
        }
        let conversation = chat.conversation(info.format)?;

        let mut ctx = JsonMap::with_capacity(self.special_tokens.len() + chat.kwargs.len() + 4);
        for (name, v) in &self.special_tokens {
            ctx.push(name, v.clone());
        }
        ctx.set("messages", conversation.messages);
        ctx.set("tools", chat.tools.clone());
        ctx.set("documents", chat.documents.clone());
        ctx.set("add_generation_prompt", chat.add_generation_prompt.clone());
        for (name, v) in &chat.kwargs {
            ctx.set(name, v.clone());
        }

        let limit = body_len.saturating_mul(OUTPUT_PER_BODY_BYTE).saturating_add(OUTPUT_SLACK);
        let text = templates.render(info, ctx.into_value(), limit).map_err(|e| match e {
            RenderError::Raised(m) => PromptError::Rejected(m),
            RenderError::Failed(m) => PromptError::Template(m),
            RenderError::TooLarge => PromptError::TooLarge { limit },
        })?;
        match conversation.final_text {
            Some(final_text) => cut_at_continue_tag(text, &final_text),
            None => Ok(text),
        }
    }
}

/// transformers' `continue_final_message`: the prompt ends where the final
/// message's text ends (the marker appended to it marks the spot), without
/// the end-of-turn the template wrote after it.
fn cut_at_continue_tag(mut text: String, final_text: &str) -> Result<String, PromptError> {
    let tag = CONTINUE_TAG.trim();
    let at = match text.rfind(tag) {
        Some(at) if text.contains(final_text.trim()) => at,
        _ => {
            return Err(PromptError::Template(
                "continue_final_message is set but the final message does not appear in the \
                 rendered chat"
                    .into(),
            ))
        }
    };
    let spaced = text[at..].starts_with(CONTINUE_TAG);
    text.truncate(at);
    if !spaced {
        // The template trimmed the marker's trailing space: trim the text too.
        let end = text.trim_end().len();
        text.truncate(end);
    }
    Ok(text)
}

/// vLLM's `truncate_prompt_tokens`: keep the last `k` tokens.
fn keep_last(mut ids: Vec<u32>, k: Option<usize>) -> Vec<u32> {
    if let Some(k) = k {
        if ids.len() > k {
            ids.drain(..ids.len() - k);
        }
    }
    ids
}

/// transformers' `update_post_processor` for the Llama/Gemma classes:
/// `[bos] $A [eos]` from the `add_*_token` flags.
fn flag_post_processor(
    tokenizer: &Tokenizer,
    cfg: &config::TokenizerConfig,
    add_bos: bool,
    add_eos: bool,
) -> Result<TemplateProcessing, String> {
    let mut specials = Vec::new();
    let mut edge =
        |on: bool, token: &Option<String>, name: &str| -> Result<Option<String>, String> {
            if !on {
                return Ok(None);
            }
            let t = token
                .as_deref()
                .ok_or_else(|| format!("add_{name}_token is set but {name}_token is not"))?;
            let id = tokenizer
                .token_to_id(t)
                .ok_or_else(|| format!("{name}_token \"{t}\" is not in the vocabulary"))?;
            specials.push((t.to_owned(), id));
            Ok(Some(t.to_owned()))
        };
    let bos = edge(add_bos, &cfg.bos_token, "bos")?;
    let eos = edge(add_eos, &cfg.eos_token, "eos")?;
    let seq = |name: &str, type_id: u32| {
        let mut pieces = Vec::new();
        pieces.extend(bos.as_ref().map(|b| format!("{b}:{type_id}")));
        pieces.push(format!("${name}:{type_id}"));
        pieces.extend(eos.as_ref().map(|e| format!("{e}:{type_id}")));
        pieces
    };
    let mut pair = seq("A", 0);
    pair.extend(seq("B", 1));
    TemplateProcessing::builder()
        .try_single(seq("A", 0))?
        .try_pair(pair)?
        .special_tokens(specials)
        .build()
        .map_err(|e| e.to_string())
}

fn one_line(e: &(dyn std::error::Error + Send + Sync)) -> String {
    e.to_string().replace('\n', " ")
}
