//! ngx_http_dynamic_bucket_module: length buckets that follow the workload.
//!
//! ```nginx
//! http {
//!     dynamic_bucket $prefill_bucket zone=prefill_len:64k alpha=0.1 window=32
//!                    prefill_short prefill_long;
//!     upstream prefill_short { server 10.0.0.1:8000; }
//!     upstream prefill_long  { server 10.0.0.2:8000; }
//!     ...
//!     location /prefill_internal/ { internal; ...; proxy_pass http://$prefill_bucket; }
//! }
//! ```
//!
//! Evaluating the variable records the request's length (the client body's,
//! in tokens by the shared rule) in a histogram shared by all workers and
//! yields the name of the upstream whose bucket holds that length, the
//! buckets being cut so that each gets an equal share of the recent token
//! load (pdgate-core's `bucket` module has the algorithm). The variable is
//! indexed and cacheable: it is evaluated once per request, and a prefill
//! subrequest shares the value with its main request. Replaces Global
//! Proxy's Lua `dynamic_bucket` sample, whose state was per worker.
//!
//! `dynamic_bucket_status` (location) shows each set's boundaries and what
//! each bucket received.

#![forbid(unsafe_code)]

use std::cell::Cell;

use pdgate_glue::core::bucket::{self, conf::BucketConf, BucketZone, Cut};
use pdgate_glue::core::tokens::tokens_for_bytes;
use pdgate_glue::ffi::{
    ngx_command_t, ngx_int_t, ngx_uint_t, NGX_CONF_2MORE, NGX_CONF_NOARGS, NGX_ERROR,
    NGX_HTTP_LOC_CONF, NGX_HTTP_MAIN_CONF, NGX_HTTP_MAIN_CONF_OFFSET, NGX_OK,
};
use pdgate_glue::http::{Conf, ConfError, Request, RequestExt, Zone};
use pdgate_glue::ngx::http::{HttpModule, HttpModuleMainConf};
use pdgate_glue::ngx::log::DebugMask;
use pdgate_glue::ngx::ngx_log_debug;
use pdgate_glue::{conf, NgxError};

/// One `dynamic_bucket` directive.
struct BucketSet {
    conf: BucketConf,
    zone: Zone<BucketZone>,
    /// This worker's boundaries (workers are single-threaded).
    cut: Cell<Cut>,
    /// Where the directive is, for errors found in postconfiguration.
    place: String,
}

/// The http-level configuration: every bucket set.
#[derive(Default)]
struct MainConf {
    // Boxed: each variable keeps a pointer to its set while the vector grows.
    #[allow(clippy::vec_box)]
    sets: Vec<Box<BucketSet>>,
}

/// A directive of this module.
const fn command(
    name: &'static std::ffi::CStr,
    type_: u32,
    set: pdgate_glue::ngx::ffi::ngx_conf_handler_pt,
    conf: usize,
) -> ngx_command_t {
    ngx_command_t {
        // nginx compares directive names with strcmp: keep the NUL.
        name: conf::name(name),
        type_: type_ as ngx_uint_t,
        set,
        conf,
        offset: 0,
        post: std::ptr::null_mut(),
    }
}

pdgate_glue::http_module! {
    module: ngx_http_dynamic_bucket_module,
    postconfiguration: check_upstreams,
    main_conf: MainConf,
    commands: [
        // At least `$var zone=… a b`: counted by the parser.
        command(
            c"dynamic_bucket",
            NGX_HTTP_MAIN_CONF | NGX_CONF_2MORE,
            Some(cmd_dynamic_bucket),
            NGX_HTTP_MAIN_CONF_OFFSET,
        ),
        command(
            c"dynamic_bucket_status",
            NGX_HTTP_LOC_CONF | NGX_CONF_NOARGS,
            Some(cmd_dynamic_bucket_status),
            0,
        ),
    ],
}

pdgate_glue::directive!(cmd_dynamic_bucket, MainConf, dynamic_bucket);

/// `dynamic_bucket $var zone=name:size [alpha=a] [window=n] upstream...;`
fn dynamic_bucket(cf: &mut Conf, main: &'static mut MainConf) -> Result<(), ConfError> {
    let c = bucket::conf::parse(&cf.args()).map_err(|e| ConfError::Directive(e.to_string()))?;
    let Some(zone) = cf.add_zone::<BucketZone>(&c.zone, c.zone_size, Module::module())? else {
        return Err(ConfError::Directive(format!(
            "zone \"{}\" is already used by another dynamic_bucket",
            String::from_utf8_lossy(&c.zone)
        )));
    };
    let place = cf.place();
    main.sets.push(Box::new(BucketSet { conf: c, zone, cut: Cell::new(Cut::default()), place }));
    // The box keeps its address while the conf lives.
    let main: &'static MainConf = main;
    let set: &'static BucketSet = main.sets.last().ok_or(ConfError::Logged)?;
    cf.add_variable(&set.conf.variable, Some(ngx_http_dynamic_bucket_variable), set)?;
    Ok(())
}

/// Every upstream named by a `dynamic_bucket` must be an `upstream {}`
/// block: `proxy_pass http://$var` then finds it by name, with no resolver.
fn check_upstreams(cf: &mut Conf) -> Result<(), NgxError> {
    let Some(main) = Module::main_conf(cf.get()) else { return Ok(()) };
    let blocks = cf.upstream_blocks();
    for set in &main.sets {
        for name in &set.conf.upstreams {
            if !blocks.iter().any(|b| b.eq_ignore_ascii_case(name)) {
                cf.emerg(&format!(
                    "dynamic_bucket ${}: no upstream \"{}\" block in {}",
                    String::from_utf8_lossy(&set.conf.variable),
                    String::from_utf8_lossy(name),
                    set.place
                ));
                return Err(NgxError);
            }
        }
    }
    Ok(())
}

pdgate_glue::variable_getter!(ngx_http_dynamic_bucket_variable, BucketSet, bucket_of);

/// The variable's value: records the request and names its upstream.
fn bucket_of<'d>(r: &mut Request, set: &'d BucketSet) -> Option<&'d [u8]> {
    // The model's count when a P/D location tokenized the prompt.
    let tokens =
        pdgate_glue::tokenize::tokens_of(r).or_else(|| r.client_body_bytes().map(tokens_for_bytes));
    let bucket = match set.zone.state() {
        Some(z) => {
            let mut cut = set.cut.get();
            let d = z.decide(tokens, &set.conf.params, &mut cut);
            set.cut.set(cut);
            d.bucket
        }
        None => 0,
    };
    let name = set.conf.upstreams.get(bucket).or(set.conf.upstreams.first())?;
    ngx_log_debug!(
        mask: DebugMask::Http,
        r.log(),
        "dynamic_bucket: ${} length {}, boundaries [{}], bucket {} \"{}\"",
        String::from_utf8_lossy(&set.conf.variable),
        tokens.map_or("unknown".to_string(), |t| format!("{t} tokens")),
        set.cut.get().lengths().map(|l| l.to_string()).collect::<Vec<_>>().join(" "),
        bucket + 1,
        String::from_utf8_lossy(name)
    );
    Some(name)
}

pdgate_glue::directive!(cmd_dynamic_bucket_status, dynamic_bucket_status);

fn dynamic_bucket_status(cf: &mut Conf) -> Result<(), ConfError> {
    cf.set_content_handler(Some(ngx_http_dynamic_bucket_status_handler))?;
    Ok(())
}

pdgate_glue::request_handler!(ngx_http_dynamic_bucket_status_handler, NGX_ERROR, status);

fn status(r: &mut Request) -> ngx_int_t {
    let rc = r.discard_request_body().0;
    if rc != NGX_OK as ngx_int_t {
        return rc;
    }
    let mut text = String::new();
    if let Some(main) = Module::main_conf(r) {
        for set in &main.sets {
            let Some(z) = set.zone.state() else { continue };
            // The latest boundaries, whatever this worker cached.
            let mut cut = Cut::default();
            z.refresh(&mut cut, set.conf.params.buckets);
            bucket::status_text(&mut text, &set.conf, &z.snapshot(), &cut);
        }
    }
    r.send(200, b"text/plain", text.as_bytes())
}
