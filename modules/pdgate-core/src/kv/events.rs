//! KV events decoder (helper A writes this).
