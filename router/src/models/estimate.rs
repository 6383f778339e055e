//! What a model will cost before it loads: its weights (the GGUF file's size: llama.cpp maps
//! it whole) and its workers' KV caches, from the hyperparameters in the GGUF header.
//!
//! The header is read here rather than through a GGUF crate: the one maintained reader on
//! crates.io (`ggus`) reads the value-type fields straight into a Rust enum, which is
//! undefined behaviour on a broken file, and a broken file must only make its model `failed`.
//! Only the metadata section is read (at most [`MAX_HEADER_BYTES`]), every length checked.

use std::io::{BufReader, Read};
use std::path::Path;

use llamapool_common::settings::WorkerPlan;

/// Most bytes of metadata read before the hyperparameters must have been found (a 262k-word
/// vocabulary takes about 8 MB).
pub const MAX_HEADER_BYTES: u64 = 64 * 1024 * 1024;

/// The hyperparameters the KV estimate needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KvShape {
    pub layers: u64,
    /// KV heads × (key length + value length), per layer and cell.
    pub kv_width: u64,
}

/// A model's estimated memory: weights plus every worker's KV cache (f16).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Estimate {
    pub weights: u64,
    pub kv: u64,
}

impl Estimate {
    pub fn total(&self) -> u64 {
        self.weights.saturating_add(self.kv)
    }
}

/// Reads `path`'s header and sizes the model for `workers`. An error says why the file is not
/// a model llama.cpp can load.
pub fn estimate(path: &Path, workers: &[WorkerPlan]) -> Result<Estimate, String> {
    let file =
        std::fs::File::open(path).map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let weights = file.metadata().map_err(|e| e.to_string())?.len();
    let shape = read_kv_shape(&mut BufReader::new(file.take(MAX_HEADER_BYTES)))
        .map_err(|e| format!("{} is not a GGUF model: {e}", path.display()))?;
    let cells: u64 = workers.iter().map(|w| u64::from(w.context.context)).sum();
    let kv = shape
        .layers
        .saturating_mul(shape.kv_width)
        .saturating_mul(cells)
        .saturating_mul(2);
    Ok(Estimate { weights, kv })
}

/// The GGUF value types (`gguf_type`).
const STRING: u32 = 8;
const ARRAY: u32 = 9;

/// Reads the header and metadata of a GGUF stream up to the hyperparameters.
pub fn read_kv_shape(r: &mut impl Read) -> Result<KvShape, String> {
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic)
        .map_err(|_| "too short".to_string())?;
    if &magic != b"GGUF" {
        return Err("no GGUF magic".into());
    }
    let version = read_u32(r)?;
    if !(2..=3).contains(&version) {
        return Err(format!("GGUF version {version} is not supported"));
    }
    let _tensors = read_u64(r)?;
    let kv_count = read_u64(r)?;
    let mut arch = String::new();
    let mut values: Vec<(String, u64)> = Vec::new();
    for _ in 0..kv_count {
        let key = read_string(r)?;
        let ty = read_u32(r)?;
        if ty == STRING && key == "general.architecture" {
            arch = read_string(r)?;
        } else if let Some(n) = scalar_size(ty) {
            let value = read_scalar(r, n)?;
            if key.contains(".attention.")
                || key.ends_with(".block_count")
                || key.ends_with(".embedding_length")
            {
                values.push((key, value));
            }
        } else {
            skip_value(r, ty, 0)?;
        }
    }
    if arch.is_empty() {
        return Err("no general.architecture".into());
    }
    let get = |name: &str| {
        let key = format!("{arch}.{name}");
        values.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    };
    let layers = get("block_count").ok_or("no block_count")?;
    let embd = get("embedding_length").ok_or("no embedding_length")?;
    let heads = get("attention.head_count").unwrap_or(1).max(1);
    let kv_heads = get("attention.head_count_kv").unwrap_or(heads);
    let head_dim = embd / heads;
    let key_len = get("attention.key_length").unwrap_or(head_dim);
    let value_len = get("attention.value_length").unwrap_or(head_dim);
    Ok(KvShape {
        layers,
        kv_width: kv_heads.saturating_mul(key_len.saturating_add(value_len)),
    })
}

fn read_u32(r: &mut impl Read) -> Result<u32, String> {
    let mut b = [0u8; 4];
    r.read_exact(&mut b).map_err(|_| "truncated".to_string())?;
    Ok(u32::from_le_bytes(b))
}

fn read_u64(r: &mut impl Read) -> Result<u64, String> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b).map_err(|_| "truncated".to_string())?;
    Ok(u64::from_le_bytes(b))
}

/// A string of at most 64 KiB (a key or a short value); longer ones are skipped unread.
fn read_string(r: &mut impl Read) -> Result<String, String> {
    let len = read_u64(r)?;
    if len > 64 * 1024 {
        skip(r, len)?;
        return Ok(String::new());
    }
    let mut bytes = vec![0u8; len as usize];
    r.read_exact(&mut bytes)
        .map_err(|_| "truncated".to_string())?;
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

fn skip(r: &mut impl Read, n: u64) -> Result<(), String> {
    let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(|e| e.to_string())?;
    if copied < n {
        return Err("truncated".into());
    }
    Ok(())
}

/// The size in bytes of a scalar type; `None` for strings, arrays and unknown types.
fn scalar_size(ty: u32) -> Option<u64> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

/// An integer scalar as u64 (floats and negative numbers are read and give 0).
fn read_scalar(r: &mut impl Read, n: u64) -> Result<u64, String> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b[..n as usize])
        .map_err(|_| "truncated".to_string())?;
    Ok(u64::from_le_bytes(b))
}

fn skip_value(r: &mut impl Read, ty: u32, depth: u32) -> Result<(), String> {
    if let Some(n) = scalar_size(ty) {
        return skip(r, n);
    }
    match ty {
        STRING => {
            let len = read_u64(r)?;
            skip(r, len)
        }
        ARRAY if depth < 4 => {
            let item = read_u32(r)?;
            let count = read_u64(r)?;
            match scalar_size(item) {
                Some(n) => skip(r, n.checked_mul(count).ok_or("array too long")?),
                None => (0..count).try_for_each(|_| skip_value(r, item, depth + 1)),
            }
        }
        _ => Err(format!("unknown value type {ty}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(out: &mut Vec<u8>, key: &str, ty: u32, value: &[u8]) {
        out.extend((key.len() as u64).to_le_bytes());
        out.extend(key.as_bytes());
        out.extend(ty.to_le_bytes());
        out.extend(value);
    }

    fn string(s: &str) -> Vec<u8> {
        let mut v = (s.len() as u64).to_le_bytes().to_vec();
        v.extend(s.as_bytes());
        v
    }

    #[test]
    fn reads_the_hyperparameters_past_arrays() {
        let mut f = b"GGUF".to_vec();
        f.extend(3u32.to_le_bytes());
        f.extend(0u64.to_le_bytes());
        f.extend(6u64.to_le_bytes());
        kv(&mut f, "general.architecture", STRING, &string("llama"));
        let tokens = [
            STRING.to_le_bytes().to_vec(),
            2u64.to_le_bytes().to_vec(),
            string("a"),
            string("bc"),
        ]
        .concat();
        kv(&mut f, "tokenizer.ggml.tokens", ARRAY, &tokens);
        kv(&mut f, "llama.block_count", 4, &30u32.to_le_bytes());
        kv(&mut f, "llama.embedding_length", 4, &576u32.to_le_bytes());
        kv(&mut f, "llama.attention.head_count", 4, &9u32.to_le_bytes());
        kv(
            &mut f,
            "llama.attention.head_count_kv",
            4,
            &3u32.to_le_bytes(),
        );
        let shape = read_kv_shape(&mut f.as_slice()).unwrap();
        assert_eq!(
            shape,
            KvShape {
                layers: 30,
                kv_width: 3 * 128
            }
        );
        for cut in [0, 3, 10, 30, f.len() - 1] {
            assert!(read_kv_shape(&mut &f[..cut]).is_err(), "cut at {cut}");
        }
        assert!(read_kv_shape(&mut &b"not a model at all"[..]).is_err());
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        let mut state = 0x2545_f491_4f6c_dd1d_u64;
        for _ in 0..2000 {
            let mut f = b"GGUF\x03\0\0\0".to_vec();
            for _ in 0..64 {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                f.extend(state.to_le_bytes().iter().map(|b| b % 16));
            }
            let _ = read_kv_shape(&mut f.as_slice());
        }
    }
}
