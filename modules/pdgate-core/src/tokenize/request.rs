//! An OpenAI request body to what vLLM's OpenAI server hands the chat
//! template and the tokenizer.
//!
//! Chat (`messages`), after vLLM's `parse_chat_messages` (text only):
//! - a message is rebuilt from the fields vLLM keeps, in its order: `role`,
//!   `content`, then `tool_calls` (assistant), `reasoning` and
//!   `reasoning_content` (assistant), `tool_call_id` (tool), `name`, `task`,
//!   `tools` (developer); anything else the client sent is dropped, so the
//!   client's key order and extra keys never reach the template;
//! - `content` (a string, a list of parts, or null) becomes, per the
//!   template's [`ContentFormat`], one string (text parts joined with `"\n"`)
//!   or a list of `{"type": "text", "text": ...}` parts; a tool message's
//!   all-text list becomes one string either way;
//! - `tool_calls[].function.arguments` given as a JSON string becomes the
//!   parsed value (`{}` when it does not parse); an empty `tool_calls` is
//!   dropped;
//! - `tools` become what `ChatCompletionToolsParam.model_dump()` gives:
//!   `{"type", "function": {"name", "description", "parameters", extras...},
//!   extras...}` with `null` for an absent description or parameters.
//!
//! Completions (`prompt`): a string, a list of token ids, or a batch (a list
//! of strings or of id lists), of which the first prompt is taken.

use std::borrow::Cow;
use std::sync::Arc;

use minijinja::value::{Value, ValueKind};

use super::source::ContentFormat;
use super::value::{self, JsonList, JsonMap};
use super::PromptError;
use crate::json::Object;

/// transformers' marker for `continue_final_message`, appended to the final
/// message's text and cut from the rendered prompt.
pub(crate) const CONTINUE_TAG: &str = "CONTINUE_FINAL_MESSAGE_TAG ";

/// A request, by endpoint.
pub(crate) enum Request<'a> {
    Chat(ChatRequest),
    Completion(CompletionRequest<'a>),
}

pub(crate) struct ChatRequest {
    /// `messages` as sent (a [`JsonList`]); see [`ChatRequest::conversation`].
    messages: Value,
    /// Normalised `tools`, or none.
    pub tools: Value,
    pub documents: Value,
    pub add_generation_prompt: Value,
    pub continue_final_message: bool,
    /// `chat_template_kwargs` entries the template sees as variables.
    pub kwargs: Vec<(String, Value)>,
    pub add_special_tokens: bool,
    pub truncate: Option<usize>,
}

pub(crate) struct CompletionRequest<'a> {
    pub prompt: Prompt<'a>,
    pub add_special_tokens: bool,
    pub truncate: Option<usize>,
}

pub(crate) enum Prompt<'a> {
    Text(Cow<'a, str>),
    Ids(Vec<u32>),
}

/// The messages as the template sees them, and for `continue_final_message`
/// the final message's text before the marker was appended.
pub(crate) struct Conversation {
    pub messages: Value,
    pub final_text: Option<String>,
}

fn invalid(msg: impl Into<String>) -> PromptError {
    PromptError::Invalid(msg.into())
}

fn unsupported(msg: impl Into<String>) -> PromptError {
    PromptError::Unsupported(msg.into())
}

/// Parses a request body; chat when it has `messages`, completions when it
/// has `prompt`.
pub(crate) fn parse(body: &[u8]) -> Result<Request<'_>, PromptError> {
    let obj = Object::parse(body).map_err(PromptError::Json)?;
    let present = |name| obj.get(name).filter(|raw| *raw != b"null");
    if let Some(raw) = present("messages") {
        return chat(&obj, raw).map(Request::Chat);
    }
    if let Some(raw) = present("prompt") {
        return completion(&obj, raw).map(Request::Completion);
    }
    Err(PromptError::NoPrompt)
}

/// Values of validated text (a failure here is a bug, reported, not a panic).
fn build(raw: &[u8]) -> Result<Value, PromptError> {
    value::parse(raw).map_err(|e| invalid(format!("malformed JSON at byte {} of a member", e.0)))
}

fn as_map(v: &Value) -> Option<Arc<JsonMap>> {
    v.downcast_object::<JsonMap>()
}

fn as_list(v: &Value) -> Option<Arc<JsonList>> {
    v.downcast_object::<JsonList>()
}

fn bool_field(obj: &Object<'_>, name: &str, default: bool) -> Result<bool, PromptError> {
    match obj.get(name) {
        None | Some(b"null") => Ok(default),
        Some(b"true") => Ok(true),
        Some(b"false") => Ok(false),
        Some(_) => Err(invalid(format!("{name} must be a boolean"))),
    }
}

/// `truncate_prompt_tokens`: keep the last k tokens. `-1` (the model's
/// maximum length, which we do not know) and `0` leave the prompt whole.
fn truncate_field(obj: &Object<'_>) -> Result<Option<usize>, PromptError> {
    let Some(raw) = obj.get("truncate_prompt_tokens").filter(|r| *r != b"null") else {
        return Ok(None);
    };
    let k = std::str::from_utf8(raw)
        .ok()
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|k| *k >= -1)
        .ok_or_else(|| invalid("truncate_prompt_tokens must be an integer of at least -1"))?;
    Ok(usize::try_from(k).ok().filter(|k| *k > 0))
}

fn chat(obj: &Object<'_>, raw: &[u8]) -> Result<ChatRequest, PromptError> {
    let messages = build(raw)?;
    if as_list(&messages).is_none() {
        return Err(invalid("messages must be a list"));
    }
    if obj.get("chat_template").is_some_and(|r| r != b"null") {
        return Err(unsupported("a chat_template in the request"));
    }
    let agp = bool_field(obj, "add_generation_prompt", true)?;
    let mut continue_final_message = bool_field(obj, "continue_final_message", false)?;
    if agp && continue_final_message {
        return Err(invalid(
            "cannot set both continue_final_message and add_generation_prompt to true",
        ));
    }
    let mut req = ChatRequest {
        messages,
        tools: match obj.get("tools") {
            Some(raw) => tools(&build(raw)?)?,
            None => Value::from(()),
        },
        documents: match obj.get("documents") {
            Some(raw) => build(raw)?,
            None => Value::from(()),
        },
        add_generation_prompt: Value::from(agp),
        continue_final_message,
        kwargs: Vec::new(),
        add_special_tokens: bool_field(obj, "add_special_tokens", false)?,
        truncate: truncate_field(obj)?,
    };

    // chat_template_kwargs: vLLM merges them over its own arguments to
    // `apply_chat_template`, which passes the rest to the template.
    if let Some(raw) = obj.get("chat_template_kwargs").filter(|r| *r != b"null") {
        let kwargs = build(raw)?;
        let map =
            as_map(&kwargs).ok_or_else(|| invalid("chat_template_kwargs must be an object"))?;
        for (k, v) in map.entries() {
            let name = k.as_str().unwrap_or_default();
            match name {
                "add_generation_prompt" => req.add_generation_prompt = v.clone(),
                "continue_final_message" => continue_final_message = v.is_true(),
                "tools" => req.tools = v.clone(),
                "documents" => req.documents = v.clone(),
                "chat_template" | "tokenize" | "messages" | "conversation" => {
                    return Err(invalid(format!("chat_template_kwargs may not set {name:?}")));
                }
                // apply_chat_template's own options, not template variables.
                "padding"
                | "truncation"
                | "max_length"
                | "return_tensors"
                | "return_dict"
                | "return_assistant_tokens_mask"
                | "tokenizer_kwargs" => {}
                _ => req.kwargs.push((name.to_owned(), v.clone())),
            }
        }
        req.continue_final_message = continue_final_message;
        if continue_final_message && req.add_generation_prompt.is_true() {
            return Err(invalid(
                "cannot set both continue_final_message and add_generation_prompt to true",
            ));
        }
    }
    if !req.documents.is_none()
        && !as_list(&req.documents).is_some_and(|l| l.0.iter().all(|d| as_map(d).is_some()))
    {
        return Err(invalid("documents must be a list of objects"));
    }
    Ok(req)
}

impl ChatRequest {
    /// True when the template gets tools (picks a `tool_use` template).
    pub(crate) fn has_tools(&self) -> bool {
        !self.tools.is_none()
    }

    /// The messages rebuilt as vLLM hands them to the template. With
    /// `continue_final_message`, [`CONTINUE_TAG`] is appended to the final
    /// message's (last) text.
    pub(crate) fn conversation(&self, format: ContentFormat) -> Result<Conversation, PromptError> {
        let list = as_list(&self.messages).ok_or_else(|| invalid("messages must be a list"))?;
        let n = list.0.len();
        if self.continue_final_message && n == 0 {
            return Err(invalid("continue_final_message is set but there are no messages"));
        }
        let mut out = Vec::with_capacity(n);
        let mut final_text = None;
        for (i, raw) in list.0.iter().enumerate() {
            let tag = self.continue_final_message && i + 1 == n;
            let (msg, text) = message(i, raw, format, tag)?;
            out.push(msg);
            final_text = text;
        }
        Ok(Conversation { messages: JsonList(out).into_value(), final_text })
    }
}

/// A content part that survives vLLM's parsing (text-only).
enum Part {
    Text(Value),
    ToolReference(Value),
}

const MEDIA_TYPES: [&str; 9] = [
    "image_url",
    "input_image",
    "image_embeds",
    "audio_embeds",
    "prompt_embeds",
    "image_pil",
    "audio_url",
    "input_audio",
    "video_url",
];

fn message(
    i: usize,
    raw: &Value,
    format: ContentFormat,
    tag: bool,
) -> Result<(Value, Option<String>), PromptError> {
    let m = as_map(raw).ok_or_else(|| invalid(format!("messages[{i}] is not an object")))?;
    let role = match m.get("role") {
        None => return Err(invalid(format!("messages[{i}].role is missing"))),
        Some(r) if r.as_str().is_some() => r.clone(),
        Some(_) => return Err(invalid(format!("messages[{i}].role must be a string"))),
    };
    let role_name = role.as_str().unwrap_or_default();
    let parts = parts(i, m.get("content"))?;

    let all_text = parts.iter().all(|p| matches!(p, Part::Text(_)));
    let mut content = if format == ContentFormat::String || (role_name == "tool" && all_text) {
        joined(&parts)
    } else {
        let mut list = Vec::with_capacity(parts.len());
        for p in &parts {
            let mut part = JsonMap::with_capacity(2);
            match p {
                Part::Text(t) => {
                    part.push("type", Value::from("text"));
                    part.push("text", t.clone());
                }
                Part::ToolReference(name) => {
                    part.push("type", Value::from("tool_reference"));
                    part.push("name", name.clone());
                }
            }
            list.push(part.into_value());
        }
        JsonList(list).into_value()
    };
    let mut final_text = None;
    if tag {
        let (tagged, text) = append_tag(&content)?;
        content = tagged;
        final_text = Some(text);
    }

    let mut out = JsonMap::with_capacity(4);
    out.push("role", role.clone());
    out.push("content", content);
    if role_name == "assistant" {
        if let Some(calls) = m.get("tool_calls").filter(|v| !v.is_none()) {
            if let Some(calls) = tool_calls(i, calls)? {
                out.push("tool_calls", calls);
            }
        }
        let reasoning = m.get("reasoning").or_else(|| m.get("reasoning_content"));
        if let Some(r) = reasoning.filter(|v| !v.is_none()) {
            out.push("reasoning", r.clone());
            out.push("reasoning_content", r.clone());
        }
    }
    if role_name == "tool" {
        if let Some(id) = m.get("tool_call_id") {
            out.push("tool_call_id", id.clone());
        }
    }
    for key in ["name", "task"] {
        if let Some(v) = m.get(key).filter(|v| v.as_str().is_some()) {
            out.push(key, v.clone());
        }
    }
    if role_name == "developer" {
        out.push("tools", m.get("tools").cloned().unwrap_or(Value::from(())));
    }
    Ok((out.into_value(), final_text))
}

/// The parts' text joined with `"\n"`; a single part is reused, not copied.
fn joined(parts: &[Part]) -> Value {
    fn text(p: &Part) -> &str {
        match p {
            Part::Text(t) | Part::ToolReference(t) => t.as_str().unwrap_or_default(),
        }
    }
    match parts {
        [] => Value::from(""),
        [Part::Text(t)] => t.clone(),
        _ => {
            let len = parts.iter().map(|p| text(p).len() + 1).sum();
            let mut s = String::with_capacity(len);
            for (n, p) in parts.iter().enumerate() {
                if n > 0 {
                    s.push('\n');
                }
                s.push_str(text(p));
            }
            Value::from(s)
        }
    }
}

/// transformers' `continue_final_message`: the marker goes after a string
/// content, or after the last part that has a `text`.
fn append_tag(content: &Value) -> Result<(Value, String), PromptError> {
    if let Some(s) = content.as_str() {
        return Ok((Value::from(format!("{s}{CONTINUE_TAG}")), s.to_owned()));
    }
    let list = as_list(content).ok_or_else(|| invalid("final message has no content"))?;
    let mut parts = list.0.clone();
    for part in parts.iter_mut().rev() {
        let Some(map) = as_map(part) else { continue };
        let Some(text) = map.get("text") else { continue };
        let text = text.as_str().unwrap_or_default().to_owned();
        let mut tagged = (*map).clone();
        tagged.set("text", Value::from(format!("{text}{CONTINUE_TAG}")));
        *part = tagged.into_value();
        return Ok((JsonList(parts).into_value(), text));
    }
    Err(invalid("continue_final_message is set but the final message has no text to continue"))
}

fn parts(i: usize, content: Option<&Value>) -> Result<Vec<Part>, PromptError> {
    let Some(content) = content.filter(|c| !c.is_none()) else { return Ok(Vec::new()) };
    if content.as_str().is_some() {
        return Ok(vec![Part::Text(content.clone())]);
    }
    let Some(list) = as_list(content) else {
        return Err(invalid(format!(
            "messages[{i}].content must be a string, a list of content parts or null"
        )));
    };
    let mut out = Vec::with_capacity(list.0.len());
    for (j, p) in list.0.iter().enumerate() {
        if p.as_str().is_some() {
            out.push(Part::Text(p.clone()));
            continue;
        }
        let at = || format!("messages[{i}].content[{j}]");
        let part =
            as_map(p).ok_or_else(|| invalid(format!("{} must be a string or an object", at())))?;
        let kind = part.get("type").filter(|t| !t.is_none());
        let field = match kind.map(|t| t.as_str()) {
            Some(Some("text" | "input_text" | "output_text")) => "text",
            Some(Some("refusal")) => "refusal",
            Some(Some("thinking")) => "thinking",
            Some(Some("tool_reference")) => "name",
            Some(Some(t)) if MEDIA_TYPES.contains(&t) => {
                return Err(unsupported(format!("{} is a multimodal part ({t:?})", at())));
            }
            Some(Some(t)) => {
                return Err(invalid(format!(
                    "{}.type {t:?} is not a supported content part type",
                    at()
                )));
            }
            Some(None) => return Err(invalid(format!("{}.type must be a string", at()))),
            None if MEDIA_TYPES.iter().any(|k| part.contains(k)) => {
                return Err(unsupported(format!("{} is a multimodal part", at())));
            }
            None if part.contains("tool_reference") => "tool_reference",
            None => return Err(invalid(format!("{}.type is missing", at()))),
        };
        match part.get(field).filter(|v| !v.is_none()) {
            // vLLM skips a text or refusal part without its text.
            None if matches!(field, "text" | "refusal") => {}
            None => return Err(invalid(format!("{}.{field} is missing", at()))),
            Some(v) if v.as_str().is_none() => {
                return Err(invalid(format!("{}.{field} must be a string", at())));
            }
            Some(v) if matches!(field, "name" | "tool_reference") => {
                out.push(Part::ToolReference(v.clone()))
            }
            Some(v) => out.push(Part::Text(v.clone())),
        }
    }
    Ok(out)
}

/// An assistant's `tool_calls` after vLLM's `_postprocess_messages`; `None`
/// when the list is empty (vLLM drops it).
fn tool_calls(i: usize, calls: &Value) -> Result<Option<Value>, PromptError> {
    let list = as_list(calls)
        .ok_or_else(|| invalid(format!("messages[{i}].tool_calls must be a list")))?;
    if list.0.is_empty() {
        return Ok(None);
    }
    let mut out = Vec::with_capacity(list.0.len());
    for (j, call) in list.0.iter().enumerate() {
        let at = format!("messages[{i}].tool_calls[{j}]");
        let call = as_map(call).ok_or_else(|| invalid(format!("{at} is not an object")))?;
        let function = call
            .get("function")
            .and_then(as_map)
            .ok_or_else(|| invalid(format!("{at}.function is missing")))?;
        let arguments = match function.get("arguments") {
            Some(a) if a.as_str().is_some() => {
                value::loads(a.as_str().unwrap_or_default()).unwrap_or_else(empty_map)
            }
            Some(a) if matches!(a.kind(), ValueKind::Map | ValueKind::Seq) => a.clone(),
            _ => empty_map(),
        };
        let mut function = (*function).clone();
        function.set("arguments", arguments);
        let mut call = (*call).clone();
        call.set("function", function.into_value());
        out.push(call.into_value());
    }
    Ok(Some(JsonList(out).into_value()))
}

fn empty_map() -> Value {
    JsonMap::default().into_value()
}

/// `tools` as `[tool.model_dump() for tool in request.tools]` gives them.
fn tools(raw: &Value) -> Result<Value, PromptError> {
    if raw.is_none() {
        return Ok(Value::from(()));
    }
    let list = as_list(raw).ok_or_else(|| invalid("tools must be a list"))?;
    let mut out = Vec::with_capacity(list.0.len());
    for (i, tool) in list.0.iter().enumerate() {
        let tool = as_map(tool).ok_or_else(|| invalid(format!("tools[{i}] is not an object")))?;
        if tool.get("type").is_some_and(|t| t.as_str() != Some("function")) {
            return Err(invalid(format!("tools[{i}].type must be \"function\"")));
        }
        let f = tool
            .get("function")
            .and_then(as_map)
            .ok_or_else(|| invalid(format!("tools[{i}].function is missing")))?;
        let name = f
            .get("name")
            .filter(|n| n.as_str().is_some())
            .ok_or_else(|| invalid(format!("tools[{i}].function.name is missing")))?;
        let mut function = JsonMap::with_capacity(f.entries().len() + 3);
        function.push("name", name.clone());
        for key in ["description", "parameters"] {
            let v = f.get(key).cloned().unwrap_or(Value::from(()));
            let ok = v.is_none()
                || if key == "description" { v.as_str().is_some() } else { as_map(&v).is_some() };
            if !ok {
                return Err(invalid(format!("tools[{i}].function.{key} has the wrong type")));
            }
            function.push(key, v);
        }
        push_extras(&mut function, &f, &["name", "description", "parameters"]);
        let mut t = JsonMap::with_capacity(tool.entries().len() + 1);
        t.push("type", Value::from("function"));
        t.push("function", function.into_value());
        push_extras(&mut t, &tool, &["type", "function"]);
        out.push(t.into_value());
    }
    Ok(JsonList(out).into_value())
}

/// pydantic's `extra="allow"`: unknown keys follow the declared fields.
fn push_extras(out: &mut JsonMap, from: &JsonMap, declared: &[&str]) {
    for (k, v) in from.entries() {
        let k = k.as_str().unwrap_or_default();
        if !declared.contains(&k) {
            out.push(k, v.clone());
        }
    }
}

fn completion<'a>(obj: &Object<'a>, raw: &'a [u8]) -> Result<CompletionRequest<'a>, PromptError> {
    if obj.get("prompt_embeds").is_some_and(|r| r != b"null") {
        return Err(unsupported("prompt_embeds"));
    }
    let shape = || {
        invalid("prompt must be a string, a list of strings, a list of token ids or a list of token id lists")
    };
    let prompt = match raw.first() {
        Some(b'"') => Prompt::Text(value::string(raw).map_err(|_| shape())?),
        Some(b'[') => {
            let items: Vec<&serde_json::value::RawValue> =
                serde_json::from_slice(raw).map_err(|_| shape())?;
            let first = items.first().ok_or_else(|| invalid("prompt is empty"))?.get().as_bytes();
            match first.first() {
                Some(b'"') => Prompt::Text(value::string(first).map_err(|_| shape())?),
                Some(b'[') => Prompt::Ids(ids(first).ok_or_else(shape)?),
                _ => Prompt::Ids(ids(raw).ok_or_else(shape)?),
            }
        }
        _ => return Err(shape()),
    };
    Ok(CompletionRequest {
        prompt,
        add_special_tokens: bool_field(obj, "add_special_tokens", true)?,
        truncate: truncate_field(obj)?,
    })
}

/// A JSON list of token ids.
fn ids(raw: &[u8]) -> Option<Vec<u32>> {
    serde_json::from_slice::<Vec<u32>>(raw).ok()
}
