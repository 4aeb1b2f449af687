//! `tokenizer_config.json` (and `chat_template.json`): what transformers
//! reads besides `tokenizer.json`.
//!
//! - `chat_template`: a string, or a list of `{"name", "template"}` from
//!   which transformers takes `"default"` (and `"tool_use"` for requests
//!   with tools).
//! - The special tokens (`bos_token`, `eos_token`, `unk_token`, `sep_token`,
//!   `pad_token`, `cls_token`, `mask_token`, `additional_special_tokens`),
//!   each a string or an AddedToken object `{"content": ...}`: transformers
//!   passes them to the template as variables (`special_tokens_map`).
//! - `add_bos_token`/`add_eos_token` and `tokenizer_class`: the Llama and
//!   Gemma tokenizer classes rebuild the post-processor from these flags
//!   (see [`super::Model::load`]).

use minijinja::value::Value;
use serde_json::Value as Json;

use super::value::JsonList;

/// The special-token attributes transformers puts in `special_tokens_map`.
const SPECIAL_NAMES: [&str; 7] =
    ["bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token"];

/// Tokenizer classes whose fast implementation derives the post-processor
/// from `add_bos_token`/`add_eos_token` (transformers' `update_post_processor`).
const FLAG_CLASSES: [&str; 6] = [
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
    "GemmaTokenizer",
    "GemmaTokenizerFast",
];

#[derive(Debug, Default)]
pub(crate) struct TokenizerConfig {
    pub chat_template: Option<String>,
    pub tool_use_template: Option<String>,
    /// `special_tokens_map`: name to a string (or a list, for
    /// `additional_special_tokens`), in [`SPECIAL_NAMES`] order.
    pub special_tokens: Vec<(&'static str, Value)>,
    pub bos_token: Option<String>,
    pub eos_token: Option<String>,
    pub add_bos_token: Option<bool>,
    pub add_eos_token: Option<bool>,
    pub tokenizer_class: Option<String>,
}

impl TokenizerConfig {
    /// When the tokenizer class builds its post-processor from the
    /// `add_*_token` flags: `Some((add_bos, add_eos))` with its defaults
    /// (BOS yes, EOS no).
    pub(crate) fn flag_post_processor(&self) -> Option<(bool, bool)> {
        let class = self.tokenizer_class.as_deref()?;
        FLAG_CLASSES
            .contains(&class)
            .then(|| (self.add_bos_token.unwrap_or(true), self.add_eos_token.unwrap_or(false)))
    }
}

/// Parses `tokenizer_config.json`; the error is one line without the path.
pub(crate) fn parse(text: &[u8]) -> Result<TokenizerConfig, String> {
    let json: Json = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    let Json::Object(obj) = &json else { return Err("top-level value is not an object".into()) };
    let mut cfg = TokenizerConfig::default();

    match obj.get("chat_template") {
        None | Some(Json::Null) => {}
        Some(Json::String(s)) => cfg.chat_template = Some(s.clone()),
        Some(Json::Array(list)) => {
            for item in list {
                let name = item.get("name").and_then(Json::as_str);
                let template = item.get("template").and_then(Json::as_str);
                let (Some(name), Some(template)) = (name, template) else {
                    return Err(
                        "chat_template list entries need \"name\" and \"template\" strings".into(),
                    );
                };
                match name {
                    "default" => cfg.chat_template = Some(template.to_owned()),
                    "tool_use" => cfg.tool_use_template = Some(template.to_owned()),
                    _ => {}
                }
            }
        }
        Some(_) => return Err("chat_template is neither a string nor a list".into()),
    }

    for name in SPECIAL_NAMES {
        if let Some(token) = token_text(obj.get(name), name)? {
            match name {
                "bos_token" => cfg.bos_token = Some(token.clone()),
                "eos_token" => cfg.eos_token = Some(token.clone()),
                _ => {}
            }
            cfg.special_tokens.push((name, Value::from(token)));
        }
    }
    match obj.get("additional_special_tokens") {
        None | Some(Json::Null) => {}
        Some(Json::Array(list)) => {
            let mut tokens = Vec::with_capacity(list.len());
            for t in list {
                if let Some(text) = token_text(Some(t), "additional_special_tokens")? {
                    tokens.push(Value::from(text));
                }
            }
            cfg.special_tokens.push(("additional_special_tokens", JsonList(tokens).into_value()));
        }
        Some(_) => return Err("additional_special_tokens is not a list".into()),
    }

    cfg.add_bos_token = flag(obj.get("add_bos_token"), "add_bos_token")?;
    cfg.add_eos_token = flag(obj.get("add_eos_token"), "add_eos_token")?;
    cfg.tokenizer_class = obj.get("tokenizer_class").and_then(Json::as_str).map(str::to_owned);
    Ok(cfg)
}

/// A special token given as a string or as an AddedToken object.
fn token_text(v: Option<&Json>, name: &str) -> Result<Option<String>, String> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(Json::Object(o)) => match o.get("content") {
            Some(Json::String(s)) => Ok(Some(s.clone())),
            _ => Err(format!("{name} has no \"content\" string")),
        },
        Some(_) => Err(format!("{name} is neither a string nor an AddedToken object")),
    }
}

fn flag(v: Option<&Json>, name: &str) -> Result<Option<bool>, String> {
    match v {
        None | Some(Json::Null) => Ok(None),
        Some(Json::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(format!("{name} is not a boolean")),
    }
}

/// The template of a processor's `chat_template.json` (`{"chat_template": ...}`).
pub(crate) fn parse_chat_template_json(text: &[u8]) -> Result<Option<String>, String> {
    let json: Json = serde_json::from_slice(text).map_err(|e| e.to_string())?;
    match json.get("chat_template") {
        None | Some(Json::Null) => Ok(None),
        Some(Json::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err("chat_template is not a string".into()),
    }
}
