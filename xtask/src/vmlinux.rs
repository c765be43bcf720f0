//! The ELF vmlinux inside a bzImage, for booting the same kernel through its PVH entry.
//!
//! A bzImage carries the kernel as a compressed ELF file (`arch/x86/boot/compressed`: the
//! `vmlinux.bin` payload is vmlinux with symbols stripped, its program headers and notes kept,
//! the PVH `XEN_ELFNOTE_PHYS32_ENTRY` note among them when the kernel has `CONFIG_PVH`). The
//! setup header says where the payload is (`payload_offset`, `payload_length`, boot protocol
//! 2.08+, Documentation/arch/x86/boot.rst). Debian's cloud kernels compress it with LZ4 in
//! the legacy frame format (`lz4 -l`: magic `0x184c2102`, then blocks of at most 8 MiB, each
//! preceded by its compressed length), followed by the 4-byte uncompressed size the kernel
//! build appends. The blocks are decoded with the lz4_flex crate; other compressions are
//! refused with a clear error.

use std::path::{Path, PathBuf};

/// Errors of this module.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file is not a bzImage this module can read.
    #[error("not a bzImage with a payload (boot protocol 2.08+): {0}")]
    NotBzImage(&'static str),
    /// The payload uses a compression this module does not decode.
    #[error("the bzImage payload is {0}-compressed; only LZ4 (legacy frames) is decoded")]
    Compression(&'static str),
    /// The LZ4 stream is malformed.
    #[error("malformed LZ4 payload at byte {offset}: {reason}")]
    Lz4 {
        /// Offset in the payload.
        offset: usize,
        /// What was wrong.
        reason: String,
    },
    /// The decompressed payload is not an ELF file.
    #[error("the decompressed payload is not an ELF file")]
    NotElf,
    /// A file could not be read or written.
    #[error("{path}")]
    Io {
        /// Which file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result of this module.
pub type Result<T> = std::result::Result<T, Error>;

const LZ4_LEGACY_MAGIC: [u8; 4] = [0x02, 0x21, 0x4c, 0x18];
/// Uncompressed size of every LZ4 legacy block but the last.
const LZ4_LEGACY_BLOCK: usize = 8 << 20;

fn le32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}

/// The compressed payload of `bzimage`.
pub fn payload(bzimage: &[u8]) -> Result<&[u8]> {
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(Error::NotBzImage("no HdrS signature"));
    }
    let version = bzimage
        .get(0x206..0x208)
        .map(|v| u16::from_le_bytes([v[0], v[1]]))
        .ok_or(Error::NotBzImage("truncated header"))?;
    if version < 0x208 {
        return Err(Error::NotBzImage("boot protocol older than 2.08"));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let offset = le32(bzimage, 0x248).ok_or(Error::NotBzImage("truncated header"))? as usize;
    let length = le32(bzimage, 0x24c).ok_or(Error::NotBzImage("truncated header"))? as usize;
    let start = (setup_sects + 1) * 512 + offset;
    bzimage
        .get(start..start.saturating_add(length))
        .ok_or(Error::NotBzImage("payload beyond the end of the file"))
}

/// Decodes an LZ4 legacy-frame stream (with the kernel's trailing size word).
pub fn lz4_legacy(stream: &[u8]) -> Result<Vec<u8>> {
    let bad = |offset, reason: &str| Error::Lz4 {
        offset,
        reason: reason.to_owned(),
    };
    if stream.get(..4) != Some(&LZ4_LEGACY_MAGIC[..]) {
        return Err(bad(0, "no legacy-frame magic"));
    }
    let mut out = Vec::new();
    let mut at = 4;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    // What follows the last block is the 4-byte size word (or nothing).
    while stream.len() - at > 4 {
        let len = le32(stream, at).ok_or_else(|| bad(at, "truncated block length"))? as usize;
        let data = stream
            .get(at + 4..at + 4 + len)
            .ok_or_else(|| bad(at, "block runs past the end"))?;
        let n = lz4_flex::block::decompress_into(data, &mut block)
            .map_err(|e| bad(at, &e.to_string()))?;
        out.extend_from_slice(&block[..n]);
        at += 4 + len;
    }
    if let Some(size) = le32(stream, at) {
        if size as usize != out.len() {
            return Err(bad(
                at,
                &format!("size word says {size} bytes, decoded {}", out.len()),
            ));
        }
    }
    Ok(out)
}

/// The ELF vmlinux inside `bzimage`.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>> {
    let payload = payload(bzimage)?;
    let elf = match payload {
        [0x02, 0x21, 0x4c, 0x18, ..] => lz4_legacy(payload)?,
        [0x1f, 0x8b, ..] => return Err(Error::Compression("gzip")),
        [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => return Err(Error::Compression("xz")),
        [0x28, 0xb5, 0x2f, 0xfd, ..] => return Err(Error::Compression("zstd")),
        [0x89, b'L', b'Z', b'O', ..] => return Err(Error::Compression("lzo")),
        [0x42, 0x5a, 0x68, ..] => return Err(Error::Compression("bzip2")),
        [0x5d, 0, 0, ..] => return Err(Error::Compression("lzma")),
        _ => return Err(Error::Compression("an unknown format")),
    };
    if elf.get(..4) != Some(b"\x7fELF") {
        return Err(Error::NotElf);
    }
    Ok(elf)
}

/// The vmlinux of the bzImage at `vmlinuz`, extracted once into `vmlinux-<release>` beside it.
pub fn cached(vmlinuz: &Path, release: &str) -> Result<PathBuf> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| Error::Io { path, source }
    };
    let dir = vmlinuz.parent().unwrap_or(Path::new("."));
    let out = dir.join(format!("vmlinux-{release}"));
    if out.exists() {
        return Ok(out);
    }
    let bzimage = std::fs::read(vmlinuz).map_err(io(vmlinuz))?;
    let elf = extract(&bzimage)?;
    let tmp = dir.join(format!(".vmlinux-{release}.tmp"));
    std::fs::write(&tmp, elf).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &out).map_err(io(&out))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A bzImage-shaped buffer with `payload` at `payload_offset` after 2 setup sectors.
    fn bzimage(payload: &[u8]) -> Vec<u8> {
        let mut b = vec![0u8; 3 * 512];
        b[0x1f1] = 2;
        b[0x202..0x206].copy_from_slice(b"HdrS");
        b[0x206..0x208].copy_from_slice(&0x20fu16.to_le_bytes());
        b[0x248..0x24c].copy_from_slice(&16u32.to_le_bytes());
        b[0x24c..0x250].copy_from_slice(&(payload.len() as u32).to_le_bytes());
        b.extend_from_slice(&[0xaa; 16]);
        b.extend_from_slice(payload);
        b.extend_from_slice(&[0xbb; 8]);
        b
    }

    fn lz4_stream(content: &[u8], chunk: usize) -> Vec<u8> {
        let mut s = LZ4_LEGACY_MAGIC.to_vec();
        for c in content.chunks(chunk) {
            let block = lz4_flex::block::compress(c);
            s.extend_from_slice(&(block.len() as u32).to_le_bytes());
            s.extend_from_slice(&block);
        }
        s.extend_from_slice(&(content.len() as u32).to_le_bytes());
        s
    }

    #[test]
    fn extracts_an_lz4_elf_payload() {
        let mut elf = b"\x7fELF".to_vec();
        elf.extend((0..100_000u32).map(|i| (i % 251) as u8));
        let image = bzimage(&lz4_stream(&elf, 30_000));
        assert_eq!(extract(&image).unwrap(), elf);
    }

    #[test]
    fn refuses_what_it_cannot_read() {
        assert!(matches!(extract(&[0; 4096]), Err(Error::NotBzImage(_))));
        let gz = bzimage(&[0x1f, 0x8b, 8, 0, 0, 0]);
        assert!(matches!(extract(&gz), Err(Error::Compression("gzip"))));
        let not_elf = bzimage(&lz4_stream(b"MZ not an elf", 64));
        assert!(matches!(extract(&not_elf), Err(Error::NotElf)));
        let mut truncated = lz4_stream(b"\x7fELF and more", 64);
        truncated[4] = 0xff; // block length far past the end
        assert!(matches!(
            extract(&bzimage(&truncated)),
            Err(Error::Lz4 { offset: 4, .. })
        ));
        let mut wrong_size = lz4_stream(b"\x7fELF and more", 64);
        let n = wrong_size.len();
        wrong_size[n - 4] ^= 1;
        assert!(matches!(
            extract(&bzimage(&wrong_size)),
            Err(Error::Lz4 { .. })
        ));
    }
}
