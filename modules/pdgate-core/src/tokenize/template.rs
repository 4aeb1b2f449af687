//! The chat template engine, set up the way transformers sets up Jinja2.
//!
//! transformers (`_compile_jinja_template` in `utils/chat_template_utils.py`)
//! renders chat templates in an `ImmutableSandboxedEnvironment` with
//! `trim_blocks=True`, `lstrip_blocks=True`, the `loopcontrols` extension,
//! its own `tojson` filter and the `raise_exception`/`strftime_now` globals.
//! Here the same template runs on minijinja with:
//!
//! - the same whitespace options (and no auto-escaping, no kept trailing
//!   newline: Jinja2's defaults);
//! - Python's string/dict methods from `minijinja_contrib::pycompat`
//!   (`.strip()`, `.startswith()`, `.split()`, `.items()`, `.get()`...);
//! - `tojson` as Python's `json.dumps` ([`pyfmt::dumps`]), `raise_exception`,
//!   `strftime_now` (UTC);
//! - values printed the way Python prints them (`{{ 1e-05 }}`, `{{ ['a'] }}`).
//!
//! Templates are compiled once at load; a render borrows the environment.
//!
//! # Bounds on a hostile template
//!
//! The template comes from the model directory, the operator's own file,
//! but a worker must not hang on a bad one. Each render is bounded by:
//! - output size: at most the `limit` passed to [`Templates::render`]
//!   (the request body size times [`OUTPUT_PER_BODY_BYTE`] plus
//!   [`OUTPUT_SLACK`]); past it the render stops with [`RenderError::TooLarge`];
//! - `range()`: at most [`RANGE_BUDGET`] elements over a whole render (each
//!   call is also capped at 100,000 by minijinja), which bounds nested loops;
//! - recursion (nested blocks, loops, macro calls): minijinja's limit of 500.
//!
//! Not bounded: CPU spent without output or `range()`, such as a macro that
//! calls itself twice per level (2^500 calls), and text built up in
//! variables (`{% set %}` blocks, concatenation; minijinja caps one
//! `'x' * n` itself) before it is written. minijinja's `fuel` feature bounds
//! every instruction and allocation; it is not enabled in this crate's
//! dependencies (adding `"fuel"` to minijinja's features and calling
//! `Environment::set_fuel` in [`Templates::compile`] would close this).

use std::io;

use minijinja::syntax::SyntaxConfig;
use minijinja::value::{Kwargs, Value, ValueKind};
use minijinja::{AutoEscape, Environment, Error, ErrorKind, Output, State, UndefinedBehavior};

use super::pyfmt::{self, JsonStyle};
use super::source::{self, ContentFormat};

/// Output allowed per byte of request body (templates repeat some content,
/// e.g. tools in two places).
pub const OUTPUT_PER_BODY_BYTE: usize = 4;
/// Output always allowed, whatever the body size (the template's own text).
pub const OUTPUT_SLACK: usize = 1 << 20;
/// Elements `range()` may produce over one render.
pub const RANGE_BUDGET: usize = 1_000_000;

/// One compiled chat template and what was learnt from its source.
#[derive(Debug, Clone)]
pub(crate) struct TemplateInfo {
    name: &'static str,
    /// vLLM's detected content format for this template.
    pub format: ContentFormat,
    /// The source mentions `content` (transformers refuses
    /// `continue_final_message` otherwise).
    pub mentions_content: bool,
}

/// The model's chat templates: the default one and, when the tokenizer
/// config names one, a `tool_use` one that transformers picks for requests
/// with tools.
pub(crate) struct Templates {
    env: Environment<'static>,
    default: TemplateInfo,
    tool_use: Option<TemplateInfo>,
}

/// Why a render failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum RenderError {
    /// The template called `raise_exception(message)`.
    Raised(String),
    /// Any other template error, in one line.
    Failed(String),
    /// The output passed the limit.
    TooLarge,
}

impl Templates {
    /// Compiles the templates; the error is one line (it ends up in `nginx -t`).
    pub(crate) fn compile(default: &str, tool_use: Option<&str>) -> Result<Templates, String> {
        let mut env = Environment::new();
        let syntax = SyntaxConfig::builder()
            .trim_blocks(true)
            .lstrip_blocks(true)
            .build()
            .map_err(|e| one_line(&e))?;
        env.set_syntax(syntax);
        env.set_auto_escape_callback(|_| AutoEscape::None);
        env.set_undefined_behavior(UndefinedBehavior::Lenient);
        env.set_debug(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.set_formatter(py_formatter);
        env.add_function("raise_exception", raise_exception);
        env.add_function("strftime_now", strftime_now);
        env.add_function("range", range);
        env.add_filter("tojson", tojson);

        let default = add(&mut env, "default", default)?;
        let tool_use = tool_use.map(|src| add(&mut env, "tool_use", src)).transpose()?;
        Ok(Templates { env, default, tool_use })
    }

    /// The template transformers renders: `tool_use` for a request with
    /// tools when the model has one, else the default.
    pub(crate) fn pick(&self, has_tools: bool) -> &TemplateInfo {
        match &self.tool_use {
            Some(t) if has_tools => t,
            _ => &self.default,
        }
    }

    /// Overrides the detected content format (vLLM's
    /// `--chat-template-content-format`).
    pub(crate) fn set_format(&mut self, format: ContentFormat) {
        self.default.format = format;
        if let Some(t) = &mut self.tool_use {
            t.format = format;
        }
    }

    /// Renders `info`'s template with `ctx` as its variables, writing at
    /// most `limit` bytes.
    pub(crate) fn render(
        &self,
        info: &TemplateInfo,
        ctx: Value,
        limit: usize,
    ) -> Result<String, RenderError> {
        let tmpl =
            self.env.get_template(info.name).map_err(|e| RenderError::Failed(one_line(&e)))?;
        let mut out = Capped { buf: Vec::with_capacity(limit.min(64 << 10)), limit };
        match tmpl.render_captured_to(ctx, &mut out) {
            Ok(_) => String::from_utf8(out.buf).map_err(|e| RenderError::Failed(e.to_string())),
            Err(e) if e.kind() == ErrorKind::WriteFailure => Err(RenderError::TooLarge),
            Err(e) if raised(&e) => {
                Err(RenderError::Raised(e.detail().unwrap_or_default().to_owned()))
            }
            Err(e) => Err(RenderError::Failed(one_line(&e))),
        }
    }
}

fn add(
    env: &mut Environment<'static>,
    name: &'static str,
    src: &str,
) -> Result<TemplateInfo, String> {
    let info = TemplateInfo {
        name,
        format: source::detect_content_format(src),
        mentions_content: src.contains("content"),
    };
    let src = source::rewrite_generation_tags(src).into_owned();
    env.add_template_owned(name, src).map_err(|e| one_line(&e))?;
    Ok(info)
}

/// An error's text on one line.
fn one_line(e: &Error) -> String {
    e.to_string().replace('\n', " ")
}

/// A writer that refuses to grow past `limit` bytes.
struct Capped {
    buf: Vec<u8>,
    limit: usize,
}

impl io::Write for Capped {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        if self.buf.len() + b.len() > self.limit {
            return Err(io::Error::other("chat template output too large"));
        }
        self.buf.extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Marks errors that come from `raise_exception`.
#[derive(Debug)]
struct Raised;

impl std::fmt::Display for Raised {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("raised by the template")
    }
}

impl std::error::Error for Raised {}

fn raised(e: &Error) -> bool {
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = cur {
        if err.downcast_ref::<Raised>().is_some() {
            return true;
        }
        cur = err.source();
    }
    false
}

/// transformers' `raise_exception(message)`: the template refuses the input.
fn raise_exception(message: &Value) -> Result<Value, Error> {
    Err(Error::new(ErrorKind::InvalidOperation, message.to_string()).with_source(Raised))
}

/// transformers' `strftime_now(format)` (Python's `datetime.now()`, which is
/// local time; a vLLM container usually runs in UTC).
fn strftime_now(format: &str) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
    pyfmt::strftime(format, now)
}

/// `range()` elements handed out so far in this render.
#[derive(Default)]
struct RangeUsed(usize);

/// minijinja's `range`, charged against [`RANGE_BUDGET`] per render.
fn range(
    state: &mut State,
    lower: isize,
    upper: Option<isize>,
    step: Option<isize>,
) -> Result<Value, Error> {
    let r = minijinja::functions::range(lower, upper, step)?;
    let used = state.get_or_insert_extension(RangeUsed::default());
    used.0 = used.0.saturating_add(r.len().unwrap_or(0));
    if used.0 > RANGE_BUDGET {
        return Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("range() produced more than {RANGE_BUDGET} elements in one render"),
        ));
    }
    Ok(r)
}

/// transformers' `tojson(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, i.e. Python's `json.dumps`.
fn tojson(value: &Value, kwargs: Kwargs) -> Result<Value, Error> {
    let mut style = JsonStyle {
        ensure_ascii: kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false),
        sort_keys: kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false),
        ..JsonStyle::default()
    };
    if let Some(indent) = kwargs.get::<Option<Value>>("indent")? {
        style.indent = match indent.kind() {
            ValueKind::None => None,
            ValueKind::String => Some(indent.as_str().unwrap_or_default().to_owned()),
            _ => Some(" ".repeat(usize::try_from(i64::try_from(indent)?.max(0)).unwrap_or(0))),
        };
    }
    if let Some(seps) = kwargs.get::<Option<Value>>("separators")? {
        if !seps.is_none() {
            let item = seps.get_item_by_index(0)?;
            let key = seps.get_item_by_index(1)?;
            match (item.as_str(), key.as_str()) {
                (Some(i), Some(k)) => style.separators = Some((i.to_owned(), k.to_owned())),
                _ => {
                    return Err(Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson separators must be two strings",
                    ))
                }
            }
        }
    }
    kwargs.assert_all_used()?;
    pyfmt::dumps(value, &style).map(Value::from)
}

/// Prints values as Jinja2 prints them: `str(value)`, which for floats and
/// containers is Python's `repr`.
fn py_formatter(out: &mut Output, _state: &mut State, value: &Value) -> Result<(), Error> {
    if let Some(s) = value.as_str() {
        return out.write_str(s).map_err(Error::from);
    }
    match value.kind() {
        ValueKind::Map | ValueKind::Seq => {}
        ValueKind::Number if !value.is_integer() => {}
        _ => return write!(out, "{value}").map_err(Error::from),
    }
    let mut s = String::new();
    pyfmt::repr(&mut s, value)?;
    out.write_str(&s).map_err(Error::from)
}
