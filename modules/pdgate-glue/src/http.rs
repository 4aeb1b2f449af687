//! Safe ground for module crates: a configuration being read ([`Conf`]),
//! a request ([`Request`], ngx's, with [`RequestExt`]), and the errors a
//! directive returns ([`ConfError`]). Module crates get these from the
//! trampolines of [`crate::module`] and need no `unsafe` of their own.
//!
//! The one assumption behind every safe method here: a `Conf` exists only
//! during an nginx configuration callback (its constructor is `unsafe`),
//! and a `&mut Request` only for a live request (ngx's constructor is
//! `unsafe`). Configuration memory lives as long as the cycle, which is
//! why, as in ngx's own `HttpModuleMainConf::main_conf`, configuration
//! values are handed out as `&'static`.

use std::ffi::c_void;
use std::marker::PhantomData;

use ngx::ffi::{
    ngx_conf_t, ngx_http_client_body_handler_pt, ngx_http_finalize_request,
    ngx_http_get_variable_pt, ngx_http_handler_pt, ngx_http_phases,
    ngx_http_read_client_request_body, ngx_http_request_t, ngx_http_upstream_main_conf_t,
    ngx_http_upstream_module, ngx_int_t, ngx_module_t, ngx_shm_zone_t, NGX_LOG_EMERG,
};
use ngx::http::HttpModuleConfExt;
pub use ngx::http::Request;

use crate::body::BodyError;
use crate::zone::ZoneState;
use crate::NgxError;

/// Why a directive was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConfError {
    /// nginx prints `"<directive>" directive <message>`.
    Directive(String),
    /// The message is already logged (or nginx logged it).
    Logged,
}

impl From<NgxError> for ConfError {
    fn from(_: NgxError) -> Self {
        ConfError::Logged
    }
}

/// The configuration being read, during an nginx configuration callback.
#[derive(Debug)]
pub struct Conf<'a> {
    cf: *mut ngx_conf_t,
    _conf: PhantomData<&'a mut ngx_conf_t>,
}

impl Conf<'_> {
    /// # Safety
    /// `cf` must be the `ngx_conf_t` nginx passed to the running callback
    /// (a directive handler or a postconfiguration).
    pub unsafe fn from_ptr(cf: *mut ngx_conf_t) -> Self {
        Conf { cf, _conf: PhantomData }
    }

    /// The raw pointer, for glue helpers.
    pub fn as_ptr(&self) -> *mut ngx_conf_t {
        self.cf
    }

    /// The conf, for ngx's typed accessors (`Module::main_conf(conf.get())`).
    pub fn get(&self) -> &ngx_conf_t {
        // SAFETY: from_ptr's contract.
        unsafe { &*self.cf }
    }

    /// The directive's arguments, its name left out.
    pub fn args(&self) -> Vec<&[u8]> {
        // SAFETY: from_ptr's contract; outside a directive `cf->args` holds
        // the last directive's (or nothing).
        unsafe {
            crate::conf::args(self.cf).iter().skip(1).map(|a| crate::conf::str_bytes(a)).collect()
        }
    }

    /// The name of the directive being read.
    pub fn args_name(&self) -> String {
        // SAFETY: from_ptr's contract, as args().
        unsafe {
            crate::conf::args(self.cf)
                .first()
                .map(|a| String::from_utf8_lossy(crate::conf::str_bytes(a)).into_owned())
                .unwrap_or_default()
        }
    }

    /// `file:line` of the directive being read.
    pub fn place(&self) -> String {
        // SAFETY: from_ptr's contract.
        unsafe { crate::conf::place(self.cf) }
    }

    /// Logs `msg` at `emerg` on the configuration's log.
    pub fn emerg(&self, msg: &str) {
        // SAFETY: from_ptr's contract: cf->log is the cycle's log.
        let log = unsafe { (*self.cf).log };
        ngx::ngx_log_error!(NGX_LOG_EMERG, log, "{}", msg);
    }

    /// Logs `msg` at `emerg` as `ngx_conf_log_error` does: with ` in
    /// <file>:<line>` of the place being read (a check of a merged
    /// configuration points at the end of its block).
    pub fn conf_emerg(&self, msg: &str) {
        ngx::ngx_conf_log_error!(NGX_LOG_EMERG, self.cf, "{}", msg);
    }

    /// Appends `handler` to the handlers of `phase` (postconfiguration).
    pub fn add_phase_handler(
        &mut self,
        phase: ngx_http_phases,
        handler: ngx_http_handler_pt,
    ) -> Result<(), NgxError> {
        // SAFETY: from_ptr's contract; nginx calls the phase arrays' users
        // only after postconfiguration.
        unsafe { crate::phase::add_handler(self.cf, phase, handler) }
    }

    /// Makes `handler` the content handler of the location being read.
    pub fn set_content_handler(&mut self, handler: ngx_http_handler_pt) -> Result<(), NgxError> {
        // SAFETY: from_ptr's contract (in a location-context directive).
        let rc = unsafe { crate::conf::set_content_handler(self.cf, handler) };
        if rc.is_null() {
            Ok(())
        } else {
            Err(NgxError)
        }
    }

    /// Declares and indexes `$name` with `get` as its handler and `data`
    /// (configuration memory) passed to it (see [`crate::variable::add`]).
    pub fn add_variable<T>(
        &mut self,
        name: &[u8],
        get: ngx_http_get_variable_pt,
        data: &'static T,
    ) -> Result<(), NgxError> {
        // SAFETY: from_ptr's contract; `data` outlives the configuration.
        unsafe { crate::variable::add(self.cf, name, get, data as *const T as *const c_void) }
    }

    /// As [`Conf::add_variable`], for a value that changes during the
    /// request (see [`crate::variable::add_volatile`]): nginx asks `get`
    /// again at each use.
    pub fn add_volatile_variable<T>(
        &mut self,
        name: &[u8],
        get: ngx_http_get_variable_pt,
        data: &'static T,
    ) -> Result<(), NgxError> {
        // SAFETY: from_ptr's contract; `data` outlives the configuration.
        unsafe {
            crate::variable::add_volatile(self.cf, name, get, data as *const T as *const c_void)
        }
    }

    /// Declares a shared zone with a `T` in it (see [`crate::zone::add`]);
    /// `Ok(None)` when this configuration already declared it.
    pub fn add_zone<T: ZoneState>(
        &mut self,
        name: &[u8],
        size: usize,
        module: &ngx_module_t,
    ) -> Result<Option<Zone<T>>, NgxError> {
        // SAFETY: from_ptr's contract.
        let z = unsafe { crate::zone::add::<T>(self.cf, name, size, module) }?;
        Ok(z.map(|zone| Zone { zone, _t: PhantomData }))
    }

    /// The names of the `upstream {}` blocks of the configuration
    /// (postconfiguration).
    pub fn upstream_blocks(&self) -> Vec<&'static [u8]> {
        // SAFETY: from_ptr's contract; the upstream main conf and its blocks
        // live as long as the configuration.
        unsafe {
            let umcf = (*self.cf).http_main_conf_unchecked::<ngx_http_upstream_main_conf_t>(
                &*std::ptr::addr_of!(ngx_http_upstream_module),
            );
            let umcf = umcf.map_or(std::ptr::null(), |u| u.as_ptr() as *const _);
            crate::upstream::blocks(umcf)
                .into_iter()
                .filter_map(|us| us.as_ref())
                .map(|us| crate::conf::str_bytes(&us.host))
                .collect()
        }
    }
}

/// A shared zone holding a `T`, declared with [`Conf::add_zone`].
#[derive(Debug)]
pub struct Zone<T> {
    zone: *mut ngx_shm_zone_t,
    _t: PhantomData<*const T>,
}

impl<T: ZoneState> Zone<T> {
    /// The zone's state, once nginx initialised it.
    pub fn state(&self) -> Option<&T> {
        // SAFETY: the zone was declared for a T by add_zone, and lives as
        // long as the configuration holding this handle.
        unsafe { crate::zone::state::<T>(self.zone) }
    }
}

/// Safe access to a live request's parts that ngx 0.5's `Request` lacks.
pub trait RequestExt {
    /// The raw request, for glue helpers.
    fn raw(&mut self) -> *mut ngx_http_request_t;
    /// The value of the first request header `name` (any case).
    fn header_in(&mut self, name: &[u8]) -> Option<&[u8]>;
    /// Appends a request header (see [`crate::headers::push_in`]).
    fn push_header_in(
        &mut self,
        name: &'static str,
        lowcase: &'static str,
        value: &[u8],
    ) -> Result<(), NgxError>;
    /// Every request header, in arrival order.
    fn headers_in_all(&mut self) -> Vec<(&[u8], &[u8])>;
    /// Replaces every request header `lowcase` with one `name: value`: the
    /// header list is rebuilt without them (what the proxy module forwards
    /// and `$http_*` read), the rest kept in order.
    fn replace_header_in(
        &mut self,
        name: &'static str,
        lowcase: &'static str,
        value: &[u8],
    ) -> Result<(), NgxError>;
    /// The whole client body, once read.
    fn body_bytes(&mut self) -> Result<&[u8], BodyError>;
    /// Bytes of the client's body (see [`crate::length::client_body_bytes`]).
    fn client_body_bytes(&mut self) -> Option<usize>;
    /// The method, URI and arguments as sent.
    fn method_name(&self) -> &[u8];
    fn uri(&self) -> &[u8];
    fn args(&self) -> &[u8];
    /// Requests served on this connection so far.
    fn connection_requests(&self) -> u64;
    /// Reads the client body, then calls `then` (a
    /// [`request_callback!`](crate::request_callback)); returns what a
    /// content handler returns for it.
    fn read_body(&mut self, then: ngx_http_client_body_handler_pt) -> ngx_int_t;
    /// A copy of `bytes` in the request's pool (a value that must live as
    /// long as the request, e.g. a variable's); None when out of memory.
    fn pool_copy(&mut self, bytes: &[u8]) -> Option<&[u8]>;
    /// Sends a whole response (see [`crate::response::send`]).
    fn send(&mut self, status: u16, content_type: &[u8], body: &[u8]) -> ngx_int_t;
    /// `ngx_http_finalize_request`; the request must not be used after.
    fn finalize(&mut self, rc: ngx_int_t);
}

impl RequestExt for Request {
    fn raw(&mut self) -> *mut ngx_http_request_t {
        self.into()
    }

    fn header_in(&mut self, name: &[u8]) -> Option<&[u8]> {
        // SAFETY: a &mut Request is a live request; header values live in
        // its pool.
        unsafe { crate::headers::find_in(self.raw(), name) }
    }

    fn push_header_in(
        &mut self,
        name: &'static str,
        lowcase: &'static str,
        value: &[u8],
    ) -> Result<(), NgxError> {
        // SAFETY: as in header_in.
        unsafe { crate::headers::push_in(self.raw(), name, lowcase, value) }
    }

    fn replace_header_in(
        &mut self,
        name: &'static str,
        lowcase: &'static str,
        value: &[u8],
    ) -> Result<(), NgxError> {
        // SAFETY: a &mut Request is a live request that has not started
        // its content phase yet (rewrite phase callers); the new list and
        // value live in its pool.
        unsafe { crate::fanout::own_header_in(self.raw(), name, lowcase, value) }
    }

    fn headers_in_all(&mut self) -> Vec<(&[u8], &[u8])> {
        // SAFETY: as in header_in.
        unsafe { crate::headers::all_in(self.raw()) }
    }

    fn body_bytes(&mut self) -> Result<&[u8], BodyError> {
        // SAFETY: as in header_in; with no body read, there is none.
        unsafe { crate::body::bytes(self.raw()) }
    }

    fn client_body_bytes(&mut self) -> Option<usize> {
        // SAFETY: as in header_in.
        unsafe { crate::length::client_body_bytes(self.raw()) }
    }

    fn method_name(&self) -> &[u8] {
        crate::response::str_of(&self.as_ref().method_name)
    }

    fn uri(&self) -> &[u8] {
        crate::response::str_of(&self.as_ref().uri)
    }

    fn args(&self) -> &[u8] {
        crate::response::str_of(&self.as_ref().args)
    }

    fn connection_requests(&self) -> u64 {
        // SAFETY: a live request has a live connection.
        unsafe { self.as_ref().connection.as_ref().map_or(0, |c| c.requests as u64) }
    }

    fn read_body(&mut self, then: ngx_http_client_body_handler_pt) -> ngx_int_t {
        // SAFETY: as in header_in; nginx calls `then` with this request.
        unsafe { ngx_http_read_client_request_body(self.raw(), then) }
    }

    fn pool_copy(&mut self, bytes: &[u8]) -> Option<&[u8]> {
        // SAFETY: as in header_in; the copy lives in the request's pool,
        // freed with the request, after this borrow ends.
        let s = unsafe { crate::headers::pool_str(self.raw(), bytes) }?;
        // SAFETY: pool_str wrote `len` bytes at `data` (or len is 0).
        Some(unsafe { crate::conf::str_bytes(&s) })
    }

    fn send(&mut self, status: u16, content_type: &[u8], body: &[u8]) -> ngx_int_t {
        // SAFETY: as in header_in.
        unsafe { crate::response::send(self.raw(), status, content_type, body) }
    }

    fn finalize(&mut self, rc: ngx_int_t) {
        // SAFETY: as in header_in.
        unsafe { ngx_http_finalize_request(self.raw(), rc) }
    }
}
