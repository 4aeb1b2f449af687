//! The encoder stage of E/P/D disaggregation (`prefill_encode`): its
//! directives. The stage itself is the driver's (pdgate-glue `driver`).
//!
//! It runs right after the client body is read:
//! when the location has `prefill_encode <prefix>` and the chat request's
//! messages hold media parts, one encoder request per item (the item alone
//! in a user message, one token, no stream; pdgate-core's `encode`) goes to
//! `<prefix><uri>`, an internal location proxying to the encoder pool. All
//! of them run at once as background in-memory subrequests, each with its
//! own body and `X-Request-Id: <id>-enc<k>`. The first failure, or the last
//! success, wakes the main request: a failure answers 502 naming the item
//! (no prefill or decode is sent; encoder requests still running finish on
//! their own and are ignored), success goes on to the prefill leg, or with
//! `prefill off` straight to the location's `proxy_pass` (a combined P/D
//! engine). A request without media skips the stage.
//!
//! Nothing of an encoder's answer is used: the engines share the encoded
//! item through their encoder cache, keyed by a hash of the item (vLLM's
//! EPD proxy behaves the same).

use pdgate_glue::core::encode::{DEFAULT_MAX_ITEMS, MAX_MAX_ITEMS};
use pdgate_glue::ffi::ngx_command_t;
use pdgate_glue::http::{Conf as NgxConf, ConfError};

use crate::{arg, dup, LocConf};

/// The stage's part of the location configuration.
#[derive(Debug, Default)]
pub struct Conf {
    /// `prefill_encode <prefix> | off`: `None` when not set at this level.
    prefix: Option<Option<Vec<u8>>>,
    /// `prefill_encode_max_items <n>`: `None` when not set at this level.
    max_items: Option<usize>,
}

impl Conf {
    /// Inherits what this level does not set.
    pub fn merge(&mut self, prev: &Conf) {
        if self.prefix.is_none() {
            self.prefix = prev.prefix.clone();
        }
        if self.max_items.is_none() {
            self.max_items = prev.max_items;
        }
    }

    /// The encoder location's URI prefix, when the stage is on.
    pub fn prefix(&self) -> Option<&[u8]> {
        self.prefix.as_ref().and_then(|p| p.as_deref())
    }

    pub fn max_items(&self) -> usize {
        self.max_items.unwrap_or(DEFAULT_MAX_ITEMS)
    }
}

/// `prefill_encode <uri-prefix> | off;`
pub const CMD_PREFILL_ENCODE: ngx_command_t =
    pdgate_glue::conf::take1(c"prefill_encode", Some(cmd_prefill_encode));

/// `prefill_encode_max_items <number>;`
pub const CMD_PREFILL_ENCODE_MAX_ITEMS: ngx_command_t =
    pdgate_glue::conf::take1(c"prefill_encode_max_items", Some(cmd_prefill_encode_max_items));

pdgate_glue::directive!(cmd_prefill_encode, LocConf, prefill_encode);

fn prefill_encode(cf: &mut NgxConf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    let enc = &mut lcf.encode;
    dup(&enc.prefix)?;
    let p = pdgate_glue::core::conf::parse_prefix(arg(cf)?)
        .map_err(|e| ConfError::Directive(e.to_string()))?;
    enc.prefix = Some(p);
    Ok(())
}

pdgate_glue::directive!(cmd_prefill_encode_max_items, LocConf, prefill_encode_max_items);

fn prefill_encode_max_items(cf: &mut NgxConf, lcf: &'static mut LocConf) -> Result<(), ConfError> {
    let enc = &mut lcf.encode;
    dup(&enc.max_items)?;
    let raw = arg(cf)?;
    match std::str::from_utf8(raw).ok().and_then(|s| s.parse::<usize>().ok()) {
        Some(n) if (1..=MAX_MAX_ITEMS).contains(&n) => {
            enc.max_items = Some(n);
            Ok(())
        }
        _ => Err(ConfError::Directive(format!(
            "invalid value \"{}\", it must be a number from 1 to {MAX_MAX_ITEMS}",
            String::from_utf8_lossy(raw)
        ))),
    }
}
