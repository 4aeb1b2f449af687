//! What the health module shows: the status page and the proxy's readiness
//! (`pd_health_ready`, checked at postconfiguration).

use std::ptr::addr_of;

use ngx::ffi::{
    ngx_http_conf_ctx_t, ngx_http_upstream_main_conf_t, ngx_http_upstream_module, ngx_module_t,
};

use super::{checked_blocks, engine_snapshot, kv_snapshot, prober_pid, snapshot};
use crate::conf::str_bytes;
use crate::http::{Conf, ConfError};
use crate::NgxError;

/// The text of a `pd_health_status` page (pdgate-core renders it): the
/// health lines, then a line per scraped engine.
pub fn status_text() -> String {
    let mut s = pdgate_core::health::status_text(prober_pid(), &snapshot());
    for (u, p, e) in engine_snapshot() {
        s.push_str(&format!(
            "upstream {} peer {} {}\n",
            String::from_utf8_lossy(&u),
            String::from_utf8_lossy(&p),
            pdgate_core::engine::status_line_text(&e)
        ));
    }
    for (u, p, k) in kv_snapshot() {
        s.push_str(&format!(
            "upstream {} peer {} {}\n",
            String::from_utf8_lossy(&u),
            String::from_utf8_lossy(&p),
            k.status_text()
        ));
    }
    s
}

/// `pd_health_ready`'s verdict for `names` (pdgate-core decides it).
pub fn readiness(names: &[Vec<u8>]) -> Result<(), String> {
    pdgate_core::health::readiness(names, &snapshot())
}

/// `pd_health_ready [upstream …]`'s location settings.
#[derive(Debug, Default)]
pub struct ReadyConf {
    pub upstreams: Vec<Vec<u8>>,
}

/// Upstreams named by `pd_health_ready` in this configuration (an empty
/// name for a bare `pd_health_ready;`), with where, checked at
/// postconfiguration (this module copy's own list).
static READY_NAMES: std::sync::Mutex<Vec<(Vec<u8>, String)>> = std::sync::Mutex::new(Vec::new());

/// Forgets the previous configuration's names (preconfiguration).
pub fn reset() {
    if let Ok(mut v) = READY_NAMES.lock() {
        v.clear();
    }
}

/// `pd_health_ready [upstream …];` in a location: the upstreams in `conf`
/// and in the list checked at postconfiguration; the module sets the
/// content handler.
pub fn ready_directive(cf: &mut Conf, conf: &mut ReadyConf) -> Result<(), ConfError> {
    let place = cf.place();
    let names: Vec<Vec<u8>> = cf.args().iter().map(|a| a.to_vec()).collect();
    if let Ok(mut v) = READY_NAMES.lock() {
        if names.is_empty() {
            v.push((Vec::new(), place));
        } else {
            v.extend(names.iter().map(|n| (n.clone(), place.clone())));
        }
    }
    conf.upstreams = names;
    Ok(())
}

/// Postconfiguration: every upstream `pd_health_ready` names must exist and
/// have `pd_health_check`; a bare `pd_health_ready` needs one that has.
pub fn check_ready_names(cf: &Conf, module: &ngx_module_t) -> Result<(), NgxError> {
    let names = READY_NAMES.lock().map(|v| v.clone()).unwrap_or_default();
    if names.is_empty() {
        return Ok(());
    }
    // SAFETY: the http conf's main conf slot of the upstream module, and
    // the blocks, live as long as the configuration.
    let checked: Vec<&[u8]> = unsafe {
        let ctx = cf.get().ctx as *const ngx_http_conf_ctx_t;
        let umcf = *(*ctx).main_conf.add((*addr_of!(ngx_http_upstream_module)).ctx_index)
            as *const ngx_http_upstream_main_conf_t;
        checked_blocks(umcf, module).iter().map(|(us, _)| str_bytes(&(**us).host)).collect()
    };
    for (name, place) in names {
        let missing = if name.is_empty() {
            checked.is_empty().then(|| "no upstream has pd_health_check".to_owned())
        } else {
            (!checked.contains(&name.as_slice())).then(|| {
                format!("upstream \"{}\" has no pd_health_check", String::from_utf8_lossy(&name))
            })
        };
        if let Some(why) = missing {
            cf.emerg(&format!("pd_health_ready: {why} in {place}"));
            return Err(NgxError);
        }
    }
    Ok(())
}
