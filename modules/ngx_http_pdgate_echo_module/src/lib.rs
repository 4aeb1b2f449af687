//! ngx_http_pdgate_echo_module: a test backend that answers with what it got.
//!
//! `pdgate_echo [prefill] [usage] [sse=N] [delay=MS] [interval=MS] [status=CODE];`
//! makes a location reply with a JSON description of the request (method,
//! uri, args, headers, body, body parsed as JSON). `prefill` adds top-level
//! `kv_transfer_params` embedding the request, like a vLLM prefill; a request
//! with `"stream": true` gets N (default 3) SSE `data:` events and `[DONE]`,
//! `interval` apart; `delay` holds the
//! answer back (timeouts); `status` sets the status. Used by the `.t` suite
//! and the samples, so P/D flows can be checked without engines.

#![forbid(unsafe_code)]

use pdgate_glue::core::echo::{answer, EchoConf, EchoRequest};
use pdgate_glue::ffi::{
    ngx_command_t, ngx_int_t, ngx_uint_t, NGX_CONF_ANY, NGX_DONE, NGX_ERROR, NGX_HTTP_LOC_CONF,
    NGX_HTTP_LOC_CONF_OFFSET, NGX_HTTP_SPECIAL_RESPONSE, NGX_LOG_INFO,
};
use pdgate_glue::http::{Conf, ConfError, Request, RequestExt};
use pdgate_glue::ngx::http::HttpModuleLocationConf;
use pdgate_glue::ngx::ngx_log_error;
use pdgate_glue::paced::{self, Paced};
use pdgate_glue::{conf, NgxError};

/// Per-location configuration: the parsed `pdgate_echo` arguments.
type LocConf = EchoConf;

pdgate_glue::http_module! {
    module: ngx_http_pdgate_echo_module,
    // Location-only directive: nothing to inherit (no merge).
    loc_conf: LocConf,
    commands: [
        ngx_command_t {
            name: conf::name(c"pdgate_echo"),
            type_: (NGX_HTTP_LOC_CONF | NGX_CONF_ANY) as ngx_uint_t,
            set: Some(cmd_pdgate_echo),
            conf: NGX_HTTP_LOC_CONF_OFFSET as ngx_uint_t,
            offset: 0,
            post: std::ptr::null_mut(),
        },
    ],
}

pdgate_glue::directive!(cmd_pdgate_echo, LocConf, pdgate_echo);

fn pdgate_echo(cf: &mut Conf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    *lcf = EchoConf::parse(&cf.args()).map_err(ConfError::Directive)?;
    cf.set_content_handler(Some(ngx_http_pdgate_echo_handler))
        .map_err(|NgxError| ConfError::Directive("has no location".into()))
}

pdgate_glue::request_handler!(ngx_http_pdgate_echo_handler, NGX_ERROR, content);

fn content(r: &mut Request) -> ngx_int_t {
    let rc = r.read_body(Some(echo_body_read));
    if rc >= NGX_HTTP_SPECIAL_RESPONSE as ngx_int_t {
        return rc;
    }
    NGX_DONE as ngx_int_t
}

pdgate_glue::request_callback!(echo_body_read, body_read);

fn body_read(r: &mut Request) {
    let Some(lcf) = Module::location_conf(r) else {
        r.finalize(NGX_ERROR as ngx_int_t);
        return;
    };
    let ans = {
        let connection_requests = r.connection_requests();
        let (method, uri, args) = (r.method_name().to_vec(), r.uri().to_vec(), r.args().to_vec());
        let log = r.log();
        let headers: Vec<(Vec<u8>, Vec<u8>)> =
            r.headers_in_all().into_iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect();
        let Ok(body) = r.body_bytes() else {
            r.finalize(NGX_ERROR as ngx_int_t);
            return;
        };
        let req = EchoRequest {
            method: &method,
            uri: &uri,
            args: &args,
            headers: headers.iter().map(|(k, v)| (&k[..], &v[..])).collect(),
            body,
            connection_requests,
        };
        ngx_log_error!(
            NGX_LOG_INFO,
            log,
            "pdgate_echo: {} {} ({} body bytes)",
            String::from_utf8_lossy(req.method),
            String::from_utf8_lossy(req.uri),
            body.len()
        );
        answer(&req, lcf.opts)
    };
    let p = Paced {
        status: lcf.status,
        content_type: if ans.sse { "text/event-stream" } else { "application/json" },
        with_length: !ans.sse,
        chunks: ans.chunks,
        delay_ms: lcf.delay_ms,
        interval_ms: if ans.sse { lcf.interval_ms } else { 0 },
    };
    paced::send(r, p);
}
