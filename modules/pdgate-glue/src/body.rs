//! Request bodies: reading the client's, seeing it as one byte slice, and
//! installing a rewritten one built from a [`Plan`].

use std::ptr;

use ngx::ffi::{
    ngx_alloc_chain_link, ngx_buf_t, ngx_chain_t, ngx_http_request_t, ngx_pcalloc, ngx_pnalloc,
    ngx_pool_t, ngx_read_file,
};
use pdgate_core::rewrite::{Piece, Plan};

/// Why the client body could not be taken as bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyError {
    /// Out of pool memory.
    NoMemory,
    /// Reading the spilled temp file failed.
    FileRead,
}

/// The whole client request body as one slice, valid for the life of the
/// request. A body held in one memory buffer is returned in place; a body in
/// several buffers or spilled to a temp file (larger than
/// `client_body_buffer_size`) is gathered once into the request pool.
///
/// # Safety
/// `r` must be a request whose body has been read completely.
pub unsafe fn bytes<'a>(r: *mut ngx_http_request_t) -> Result<&'a [u8], BodyError> {
    // SAFETY: after ngx_http_read_client_request_body completed, rb->bufs is
    // a chain of memory or file buffers owned by the request pool.
    unsafe {
        let rb = (*r).request_body;
        if rb.is_null() || (*rb).bufs.is_null() {
            return Ok(&[]);
        }
        let mut total = 0usize;
        let mut parts = 0usize;
        let mut single: Option<&'a [u8]> = None;
        let mut cl = (*rb).bufs;
        while !cl.is_null() {
            let b = (*cl).buf;
            let n = buf_len(b);
            if n > 0 {
                parts += 1;
                if (*b).in_file() == 0 {
                    single = Some(std::slice::from_raw_parts((*b).pos, n));
                } else {
                    single = None;
                }
                total += n;
            }
            cl = (*cl).next;
        }
        if total == 0 {
            return Ok(&[]);
        }
        if parts == 1 {
            if let Some(s) = single {
                return Ok(s);
            }
        }
        let dst = ngx_pnalloc((*r).pool, total) as *mut u8;
        if dst.is_null() {
            return Err(BodyError::NoMemory);
        }
        let mut off = 0usize;
        let mut cl = (*rb).bufs;
        while !cl.is_null() {
            let b = (*cl).buf;
            let n = buf_len(b);
            if n > 0 {
                if (*b).in_file() != 0 {
                    let got = ngx_read_file((*b).file, dst.add(off), n, (*b).file_pos);
                    if got != n as isize {
                        return Err(BodyError::FileRead);
                    }
                } else {
                    ptr::copy_nonoverlapping((*b).pos, dst.add(off), n);
                }
                off += n;
            }
            cl = (*cl).next;
        }
        Ok(std::slice::from_raw_parts(dst, total))
    }
}

/// Bytes held by a buffer, in memory or in its file.
///
/// # Safety
/// `b` must be a valid buffer.
unsafe fn buf_len(b: *const ngx_buf_t) -> usize {
    // SAFETY: the caller passes a valid buffer; positions are within it.
    unsafe {
        if (*b).in_file() != 0 {
            ((*b).file_last - (*b).file_pos).max(0) as usize
        } else if (*b).pos.is_null() {
            0
        } else {
            (*b).last.offset_from((*b).pos).max(0) as usize
        }
    }
}

/// The bytes of a response chain held in memory (an in-memory subrequest's
/// `r->out`), gathered into the pool if there is more than one buffer.
///
/// # Safety
/// `pool` must be live and `chain` a valid chain of memory buffers (or NULL).
pub unsafe fn chain_bytes<'a>(
    pool: *mut ngx_pool_t,
    chain: *mut ngx_chain_t,
) -> Result<&'a [u8], BodyError> {
    // SAFETY: as for `bytes`; file buffers do not occur in memory output.
    unsafe {
        let mut total = 0;
        let mut count = 0;
        let mut last: *mut ngx_buf_t = ptr::null_mut();
        let mut cl = chain;
        while !cl.is_null() {
            let b = (*cl).buf;
            if !b.is_null() && (*b).in_file() == 0 {
                let n = buf_len(b);
                if n > 0 {
                    total += n;
                    count += 1;
                    last = b;
                }
            }
            cl = (*cl).next;
        }
        if total == 0 {
            return Ok(&[]);
        }
        if count == 1 {
            return Ok(std::slice::from_raw_parts((*last).pos, total));
        }
        let dst = ngx_pnalloc(pool, total) as *mut u8;
        if dst.is_null() {
            return Err(BodyError::NoMemory);
        }
        let mut off = 0;
        let mut cl = chain;
        while !cl.is_null() {
            let b = (*cl).buf;
            if !b.is_null() && (*b).in_file() == 0 {
                let n = buf_len(b);
                ptr::copy_nonoverlapping((*b).pos, dst.add(off), n);
                off += n;
            }
            cl = (*cl).next;
        }
        Ok(std::slice::from_raw_parts(dst, total))
    }
}

/// Plans whose literal runs are shorter than this are gathered; longer
/// source ranges are referenced in place.
const GATHER_MAX: usize = 512;

/// Builds a request-body chain from a plan over `src` without copying the
/// large source ranges: each becomes a buffer pointing into `src` (which must
/// live as long as the request); everything else is gathered into one pool
/// block. Returns the chain and its length.
///
/// Buffers have `start == pos`, as `ngx_http_upstream_reinit` rewinds request
/// buffers to `start` when it retries another server.
///
/// # Safety
/// `pool` must be the request pool and `src` must outlive it.
pub unsafe fn chain_from_plan(
    pool: *mut ngx_pool_t,
    src: &[u8],
    plan: &Plan<'_>,
) -> Result<(*mut ngx_chain_t, usize), BodyError> {
    let by_ref = |p: &Piece<'_>| matches!(p, Piece::Src(r) if r.len() >= GATHER_MAX);
    let gathered: usize = plan
        .pieces
        .iter()
        .filter(|p| !by_ref(p))
        .map(|p| match p {
            Piece::Src(r) => r.len(),
            Piece::Lit(s) => s.len(),
            Piece::Ext(b) => b.len(),
        })
        .sum();
    // SAFETY: all writes go to fresh pool allocations of the computed sizes;
    // source ranges come from a plan built over `src`, so they are in bounds
    // (slicing checks it).
    unsafe {
        let block =
            if gathered > 0 { ngx_pnalloc(pool, gathered) as *mut u8 } else { ptr::null_mut() };
        if gathered > 0 && block.is_null() {
            return Err(BodyError::NoMemory);
        }
        let mut head: *mut ngx_chain_t = ptr::null_mut();
        let mut tail: *mut *mut ngx_chain_t = &mut head;
        let mut fill = 0usize; // bytes of `block` used
        let mut run_start = 0usize; // start of the current gathered run
        let mut total = 0usize;
        let mut last_buf: *mut ngx_buf_t = ptr::null_mut();

        let link = |tail: &mut *mut *mut ngx_chain_t, start: *mut u8, len: usize, temp: bool| {
            let b = ngx_pcalloc(pool, std::mem::size_of::<ngx_buf_t>()) as *mut ngx_buf_t;
            let cl = ngx_alloc_chain_link(pool);
            if b.is_null() || cl.is_null() {
                return Err(BodyError::NoMemory);
            }
            (*b).start = start;
            (*b).pos = start;
            (*b).last = start.add(len);
            (*b).end = start.add(len);
            if temp {
                (*b).set_temporary(1);
            } else {
                (*b).set_memory(1);
            }
            (*cl).buf = b;
            (*cl).next = ptr::null_mut();
            **tail = cl;
            *tail = &mut (*cl).next;
            Ok(b)
        };

        for p in &plan.pieces {
            if by_ref(p) {
                if fill > run_start {
                    last_buf = link(&mut tail, block.add(run_start), fill - run_start, true)?;
                    run_start = fill;
                }
                let Piece::Src(r) = p else { continue };
                let s = &src[r.clone()];
                last_buf = link(&mut tail, s.as_ptr() as *mut u8, s.len(), false)?;
                total += s.len();
                continue;
            }
            let bytes: &[u8] = match p {
                Piece::Src(r) => &src[r.clone()],
                Piece::Lit(s) => s.as_bytes(),
                Piece::Ext(b) => b,
            };
            ptr::copy_nonoverlapping(bytes.as_ptr(), block.add(fill), bytes.len());
            fill += bytes.len();
            total += bytes.len();
        }
        if fill > run_start {
            last_buf = link(&mut tail, block.add(run_start), fill - run_start, true)?;
        }
        if !last_buf.is_null() {
            (*last_buf).set_last_buf(1);
            (*last_buf).set_last_in_chain(1);
        }
        Ok((head, total))
    }
}
