//! ngx_http_prefill_module: the sequential (vLLM NIXL) P/D flow.
//!
//! In the precontent phase of a main request in a location with `prefill`:
//! 1. read the whole client body (`ngx_http_read_client_request_body`);
//! 2. check it is a JSON object and send a rewritten copy (one token, no
//!    stream, KV kept for a remote decode) as a waited, in-memory subrequest
//!    to `<prefix><uri>`, an internal location proxying to the prefill pool;
//! 3. when it finishes, either build the decode body (the client's body with
//!    the prefill's `kv_transfer_params`) and let the location's `proxy_pass`
//!    send it to the decode pool, or answer the client with the prefill's
//!    error or one of ours.
//!
//! The shape follows nginx's mirror (body, `preserve_body`, resume the phases)
//! and auth_request (waited subrequest, post handler records, re-entry acts).
//! Every decision comes from pdgate-core; this file only executes them.

#![forbid(unsafe_code)]

use std::mem::offset_of;

use pdgate_glue::core::encode::{media_items, too_many_message};
use pdgate_glue::core::json::Object;
use pdgate_glue::core::pd::flow::{Legs, Shape, Spec};
use pdgate_glue::core::rewrite::{
    decode_plan, has_reserved, kv_params_of, pd_refusal, prefill_plan, stripped_plan, Endpoint,
    KvParams, PrefillOptions, StreamOps,
};
use pdgate_glue::driver::{self, Bodies, Body, Prepared, Protocol, Record, Refusal};
use pdgate_glue::ffi::{ngx_flag_t, ngx_module_t, NGX_LOG_INFO, NGX_LOG_WARN};
use pdgate_glue::http::{Conf, ConfError, Request};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleLocationConf, Merge, MergeConfigError};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::{ngx_log_debug, ngx_log_error};
use pdgate_glue::{conf, NgxError};

// E/P/D: the encoder stage before the prefill (`prefill_encode`).
mod encode;
// Metrics and `$pd_*` log variables (`pd_metrics`, `pd_metrics_zone`).
mod metrics;

const NGX_CONF_UNSET: ngx_flag_t = -1;

/// Per-location configuration.
#[derive(Debug)]
pub struct LocConf {
    /// `prefill <prefix>`: `None` when not set at this level.
    prefix: Option<Option<Vec<u8>>>,
    /// `prefill_kv_transfer_params on|off`.
    kv_params: ngx_flag_t,
    /// `prefill_encode`, `prefill_encode_max_items` (encode.rs).
    encode: encode::Conf,
    /// `stream_ops off|add|set_opt`: `None` when not set at this level.
    stream_ops: Option<StreamOps>,
    /// `pd_strip_reserved on|off`.
    strip: ngx_flag_t,
    /// `prefill_fallback decode|off`: `None` when not set at this level.
    fallback: Option<bool>,
    /// `pd_hold …`: requests wait in the proxy for room in the pools.
    hold: Option<pdgate_glue::hold::Hold>,
    /// `pd_tokenizer …`: the model's tokenizer counts and keys prompts.
    tokenizer: Option<pdgate_glue::tokenize::Tokenizer>,
}

impl Default for LocConf {
    fn default() -> Self {
        LocConf {
            prefix: None,
            kv_params: NGX_CONF_UNSET,
            encode: encode::Conf::default(),
            stream_ops: None,
            strip: NGX_CONF_UNSET,
            fallback: None,
            hold: None,
            tokenizer: None,
        }
    }
}

impl Merge for LocConf {
    fn merge(&mut self, prev: &Self) -> Result<(), MergeConfigError> {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.kv_params == NGX_CONF_UNSET {
            self.kv_params = if prev.kv_params == NGX_CONF_UNSET { 1 } else { prev.kv_params };
        }
        self.encode.merge(&prev.encode);
        if self.strip == NGX_CONF_UNSET {
            self.strip = if prev.strip == NGX_CONF_UNSET { 0 } else { prev.strip };
        }
        if self.stream_ops.is_none() {
            self.stream_ops = prev.stream_ops;
        }
        if self.fallback.is_none() {
            self.fallback = prev.fallback;
        }
        if self.hold.is_none() {
            self.hold = prev.hold.clone();
        }
        if self.tokenizer.is_none() {
            self.tokenizer = prev.tokenizer.clone();
        }
        Ok(())
    }
}

use pdgate_glue::conf::ANY_LEVEL;

pdgate_glue::http_module! {
    module: ngx_http_prefill_module,
    preconfiguration: preconfiguration,
    postconfiguration: postconfiguration,
    main_conf: metrics::MainConf,
    loc_conf: LocConf,
    merge_loc_conf: yes,
    check_loc_conf: check_loc_conf,
    commands: [
        conf::take1(c"prefill", Some(cmd_prefill)),
        conf::flag(c"prefill_kv_transfer_params", offset_of!(LocConf, kv_params)),
        encode::CMD_PREFILL_ENCODE,
        encode::CMD_PREFILL_ENCODE_MAX_ITEMS,
        conf::take1(c"stream_ops", Some(cmd_stream_ops)),
        conf::flag(c"pd_strip_reserved", offset_of!(LocConf, strip)),
        conf::take1(c"prefill_fallback", Some(cmd_fallback)),
        conf::loc_command(c"pd_hold", ANY_LEVEL | pdgate_glue::ffi::NGX_CONF_1MORE, Some(cmd_hold)),
        conf::loc_command(c"pd_tokenizer", ANY_LEVEL | pdgate_glue::ffi::NGX_CONF_1MORE, Some(cmd_tokenizer)),
        metrics::CMD_PD_METRICS,
        metrics::CMD_PD_METRICS_ZONE,
        metrics::CMD_ENABLE_INTERNAL_METRICS,
    ],
}

/// Declares the `$pd_*` variables.
fn preconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    driver::declare_variables::<Vllm>(cf)
}

/// Creates the metrics zone when asked for, then installs the driver.
fn postconfiguration(cf: &mut Conf) -> Result<(), NgxError> {
    metrics::postconfiguration(cf)?;
    driver::install::<Vllm>(cf)
}

/// The directive's one argument (`NGX_CONF_TAKE1` guarantees it).
fn arg<'a>(cf: &'a Conf) -> Result<&'a [u8], ConfError> {
    cf.args().first().copied().ok_or_else(|| ConfError::Directive("needs an argument".into()))
}

/// `"is duplicate"` when `v` is set at this level already.
fn dup<T>(v: &Option<T>) -> Result<(), ConfError> {
    match v {
        Some(_) => Err(ConfError::Directive("is duplicate".into())),
        None => Ok(()),
    }
}

pdgate_glue::directive!(cmd_stream_ops, LocConf, stream_ops);

/// `stream_ops off | add | set_opt;`
fn stream_ops(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.stream_ops)?;
    let v = arg(cf)?;
    let ops = StreamOps::parse(v).ok_or_else(|| {
        ConfError::Directive(format!(
            "invalid value \"{}\", it must be \"off\", \"add\" or \"set_opt\"",
            String::from_utf8_lossy(v)
        ))
    })?;
    lcf.stream_ops = Some(ops);
    Ok(())
}

/// `pd_hold`'s pools must be upstream blocks.
fn check_loc_conf(cf: &Conf, lcf: &LocConf) -> Result<(), String> {
    lcf.hold.as_ref().map_or(Ok(()), |h| pdgate_glue::hold::check(cf, h))
}

pdgate_glue::directive!(cmd_tokenizer, LocConf, tokenizer);

/// `pd_tokenizer <model dir> [block_size=N] [hash=sha256_cbor|xxhash_cbor] [seed=S] [max_blocks=N];`
fn tokenizer(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    pdgate_glue::tokenize::directive(cf, &mut lcf.tokenizer)
}

pdgate_glue::directive!(cmd_hold, LocConf, hold);

/// `pd_hold prefill=<upstream>[:N] decode=<upstream>[:N] [queue=N] [timeout=time] [status=429|503] [retry_after=N];`
fn hold(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    pdgate_glue::hold::directive(cf, &mut lcf.hold)
}

pdgate_glue::directive!(cmd_fallback, LocConf, fallback);

/// `prefill_fallback decode | off;`
fn fallback(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.fallback)?;
    let v = arg(cf)?;
    lcf.fallback = Some(match v {
        b"decode" => true,
        b"off" => false,
        _ => {
            return Err(ConfError::Directive(format!(
                "invalid value \"{}\", it must be \"decode\" or \"off\"",
                String::from_utf8_lossy(v)
            )))
        }
    });
    Ok(())
}

pdgate_glue::directive!(cmd_prefill, LocConf, prefill);

/// `prefill <uri-prefix> | off;`
fn prefill(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    dup(&lcf.prefix)?;
    let p = pdgate_glue::core::conf::parse_prefix(arg(cf)?)
        .map_err(|e| ConfError::Directive(e.to_string()))?;
    lcf.prefix = Some(p);
    Ok(())
}

/// The sequential (vLLM NIXL) protocol, with the encoder stage before it.
struct Vllm;

impl Protocol for Vllm {
    type State = ();
    const NAME: &'static str = "prefill";

    fn module() -> &'static ngx_module_t {
        Module::module()
    }

    fn spec(r: &Request) -> Option<Spec> {
        let lcf = Module::location_conf(r)?;
        let prefill = matches!(&lcf.prefix, Some(Some(_)));
        let encode = lcf.encode.prefix().is_some();
        // `pd_strip_reserved` alone: read and check bodies an engine would
        // parse as JSON, forward everything else untouched.
        let strip = lcf.strip == 1 && driver::may_carry_json(r);
        if !prefill && !encode && !strip {
            return None;
        }
        let shape = if prefill { Shape::Sequential } else { Shape::DecodeOnly };
        let fallback = prefill && lcf.fallback == Some(true);
        Some(Spec { encode, shape, retries: 0, fallback })
    }

    fn prepare(r: &Request, bodies: &Bodies, _: &mut ()) -> Result<Prepared, Refusal> {
        let lcf = Module::location_conf(r).ok_or(Refusal::new(500, "no prefill configuration"))?;
        let prefix = match &lcf.prefix {
            Some(Some(p)) => Some(p.as_slice()),
            _ => None,
        };
        let uri = r.path().as_bytes();
        let obj = match Object::parse(bodies.src()) {
            Ok(obj) => obj,
            // The prefill leg rewrites the body, so it must be an object...
            Err(e) if prefix.is_some() => {
                return Err(Refusal::new(
                    e.status(),
                    format!("request body is not a JSON object: {e}"),
                ))
            }
            // ...and so must one beyond the bounds, whose reserved keys
            // could not be looked for (pd_strip_reserved, encoder stage)...
            Err(e) if e.is_bound() => {
                return Err(Refusal::new(e.status(), format!("request body refused: {e}")))
            }
            // ...but a combined P/D engine gets any other as it is, and judges it.
            Err(_) => return Ok(Prepared::default()),
        };
        let mut p = Prepared::default();
        if let Some(prefix) = prefix {
            if let Some(why) = pd_refusal(&obj) {
                return Err(Refusal::new(400, why));
            }
            let opts = PrefillOptions {
                endpoint: Endpoint::from_uri(uri),
                kv_transfer_params: lcf.kv_params != 0,
            };
            let body = bodies.build(&prefill_plan(&obj, opts))?;
            p.prefill = Some((driver::leg_uri(prefix, uri), body));
        }
        if let Some(eprefix) = lcf.encode.prefix() {
            let items = media_items(&obj);
            if items.len() > lcf.encode.max_items() {
                return Err(Refusal::new(
                    400,
                    too_many_message(items.len(), lcf.encode.max_items()),
                ));
            }
            p.media = items;
            p.encode_uri = driver::leg_uri(eprefix, uri);
        }
        if prefix.is_none() && has_reserved(&obj) {
            // No prefill leg to rebuild the body: the body goes on to the
            // engine as sent, less the keys only the proxy may set.
            ngx_log_error!(
                NGX_LOG_INFO,
                r.log(),
                "prefill: reserved keys (kv_transfer_params, bootstrap_*, …) dropped from the request body"
            );
            p.decode = Some(bodies.build(&stripped_plan(&obj))?);
        }
        p.obj = Some(obj);
        Ok(p)
    }

    fn decode_after_prefill(
        r: &Request,
        bodies: &Bodies,
        obj: &Object<'static>,
        answer: &'static [u8],
        m: &mut Record,
    ) -> Result<Body, Refusal> {
        let log = r.log();
        let kv = match kv_params_of(answer) {
            KvParams::Found(kv) => Some(kv),
            KvParams::Missing => {
                m.kv_missing();
                ngx_log_error!(
                    NGX_LOG_WARN,
                    log,
                    "prefill answer has no \"kv_transfer_params\", decode will recompute the prompt"
                );
                None
            }
            KvParams::NotObject(v) => {
                m.kv_missing();
                ngx_log_error!(
                    NGX_LOG_WARN,
                    log,
                    "prefill answer's \"kv_transfer_params\" is not a JSON object ({} bytes starting {:?}), not forwarded, decode will recompute the prompt",
                    v.len(),
                    String::from_utf8_lossy(v.get(..v.len().min(16)).unwrap_or_default())
                );
                None
            }
            KvParams::Invalid(e) => {
                m.kv_missing();
                ngx_log_error!(
                    NGX_LOG_WARN,
                    log,
                    "prefill answer is not a JSON object ({}), decode will recompute the prompt",
                    e
                );
                None
            }
        };
        let ops = Module::location_conf(r).and_then(|c| c.stream_ops).unwrap_or_default();
        let body = bodies.build(&decode_plan(obj, kv, ops))?;
        ngx_log_debug!(
            mask: DebugMask::Http,
            log,
            "prefill: kv_transfer_params {} bytes",
            kv.map_or(0, <[u8]>::len)
        );
        Ok(body)
    }

    fn decode_alone(
        r: &Request,
        bodies: &Bodies,
        obj: &Object<'static>,
    ) -> Option<Result<Body, Refusal>> {
        let ops = Module::location_conf(r).and_then(|c| c.stream_ops).unwrap_or_default();
        Some(bodies.build(&decode_plan(obj, None, ops)))
    }

    fn release(_: &mut (), _: Legs) {}

    fn hold(r: &Request) -> Option<&'static pdgate_glue::hold::Hold> {
        Module::location_conf(r)?.hold.as_ref()
    }

    fn tokenizer(r: &Request) -> Option<&'static pdgate_glue::tokenize::Tokenizer> {
        Module::location_conf(r)?.tokenizer.as_ref()
    }
}
