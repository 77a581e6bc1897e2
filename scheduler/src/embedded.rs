//! The workflow embedded in an image saved by ComfyUI or sakuga, so a picture can be run
//! again: PNG text chunks (`tEXt`/`iTXt` as SaveImage writes them, `comf` after the frames of
//! an APNG) and the EXIF block of a WebP (`Model` = `prompt:{json}`, `Make` =
//! `workflow:{json}`). The API-format `prompt` is preferred, being exactly what ran; the
//! UI-format `workflow` is the fallback, for [`crate::ui_format`] to convert.

use serde_json::Value as Json;

use crate::error::SchedulerError;

const PNG_SIGNATURE: &[u8] = b"\x89PNG\r\n\x1a\n";

/// An image container that can carry a workflow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageKind {
    Png,
    Webp,
}

impl ImageKind {
    fn name(self) -> &'static str {
        match self {
            ImageKind::Png => "png",
            ImageKind::Webp => "webp",
        }
    }
}

/// The container `bytes` start like, if any.
pub fn image_kind(bytes: &[u8]) -> Option<ImageKind> {
    if bytes.starts_with(PNG_SIGNATURE) {
        Some(ImageKind::Png)
    } else if bytes.len() >= 12 && &bytes[0..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        Some(ImageKind::Webp)
    } else {
        None
    }
}

/// The workflow embedded in a PNG or WebP: its `prompt` (API format) when present, else
/// its `workflow` (UI format).
///
/// # Errors
/// [`SchedulerError::NoEmbeddedWorkflow`] when the bytes are no PNG or WebP, hold neither
/// entry, or hold one that is not JSON.
pub fn embedded_workflow(bytes: &[u8]) -> Result<Json, SchedulerError> {
    let kind = image_kind(bytes).ok_or(SchedulerError::NoEmbeddedWorkflow {
        what: "image",
        reason: "not a PNG or WebP file".into(),
    })?;
    let entries = match kind {
        ImageKind::Png => png_text(bytes),
        ImageKind::Webp => webp_exif_text(bytes),
    };
    let missing = || SchedulerError::NoEmbeddedWorkflow {
        what: kind.name(),
        reason: "no embedded prompt or workflow (saved with metadata off, or by another tool?)"
            .into(),
    };
    let (key, text) = ["prompt", "workflow"]
        .iter()
        .find_map(|want| entries.iter().find(|(key, _)| key == want))
        .ok_or_else(missing)?;
    serde_json::from_str(text).map_err(|e| SchedulerError::NoEmbeddedWorkflow {
        what: kind.name(),
        reason: format!("its embedded {key} is not JSON: {e}"),
    })
}

/// `(keyword, text)` of every uncompressed text chunk, wherever it sits.
fn png_text(bytes: &[u8]) -> Vec<(String, String)> {
    let mut entries = Vec::new();
    let mut at = PNG_SIGNATURE.len();
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let kind = &header[4..8];
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(len)) else {
            break;
        };
        match kind {
            b"tEXt" | b"comf" => entries.extend(split_keyword(data).map(|(k, v)| (k, latin1(v)))),
            b"iTXt" => entries.extend(itxt(data)),
            b"IEND" => break,
            _ => {}
        }
        at += 12 + len;
    }
    entries
}

fn split_keyword(data: &[u8]) -> Option<(String, &[u8])> {
    let nul = data.iter().position(|&b| b == 0)?;
    Some((latin1(&data[..nul]), &data[nul + 1..]))
}

fn latin1(bytes: &[u8]) -> String {
    bytes.iter().map(|&b| char::from(b)).collect()
}

/// An uncompressed international text chunk: keyword, flag, method, language, translated
/// keyword, UTF-8 text.
fn itxt(data: &[u8]) -> Option<(String, String)> {
    let (keyword, rest) = split_keyword(data)?;
    let (&compressed, rest) = rest.split_first()?;
    if compressed != 0 {
        return None;
    }
    let rest = rest.get(1..)?;
    let language_end = rest.iter().position(|&b| b == 0)?;
    let rest = &rest[language_end + 1..];
    let translated_end = rest.iter().position(|&b| b == 0)?;
    let text = std::str::from_utf8(&rest[translated_end + 1..]).ok()?;
    Some((keyword, text.to_string()))
}

/// `key:value` ASCII entries of the first IFD of a WebP's EXIF chunk, as ComfyUI writes
/// them through PIL.
fn webp_exif_text(bytes: &[u8]) -> Vec<(String, String)> {
    let mut at = 12;
    while let Some(header) = bytes.get(at..at + 8) {
        let len = u32::from_le_bytes([header[4], header[5], header[6], header[7]]) as usize;
        let Some(data) = bytes.get(at + 8..(at + 8).saturating_add(len)) else {
            break;
        };
        if &header[0..4] == b"EXIF" {
            let tiff = data.strip_prefix(b"Exif\0\0").unwrap_or(data);
            return tiff_ascii(tiff)
                .into_iter()
                .filter_map(|text| {
                    let (key, value) = text.split_once(':')?;
                    Some((key.to_string(), value.to_string()))
                })
                .collect();
        }
        at += 8 + len + len % 2;
    }
    Vec::new()
}

/// The ASCII values of IFD0 in a TIFF block of either byte order.
fn tiff_ascii(tiff: &[u8]) -> Vec<String> {
    let big = match tiff.get(0..2) {
        Some(b"II") => false,
        Some(b"MM") => true,
        _ => return Vec::new(),
    };
    let u16_at = |at: usize| {
        tiff.get(at..at + 2).map(|b| {
            let b = [b[0], b[1]];
            if big {
                u16::from_be_bytes(b)
            } else {
                u16::from_le_bytes(b)
            }
        })
    };
    let u32_at = |at: usize| {
        tiff.get(at..at + 4).map(|b| {
            let b = [b[0], b[1], b[2], b[3]];
            if big {
                u32::from_be_bytes(b)
            } else {
                u32::from_le_bytes(b)
            }
        })
    };
    let Some(ifd) = u32_at(4).map(|o| o as usize) else {
        return Vec::new();
    };
    let count = u16_at(ifd).unwrap_or(0) as usize;
    let mut values = Vec::new();
    for entry in (0..count).map(|i| ifd + 2 + 12 * i) {
        let (Some(2), Some(len)) = (u16_at(entry + 2), u32_at(entry + 4)) else {
            continue;
        };
        let len = len as usize;
        let start = if len <= 4 {
            entry + 8
        } else {
            u32_at(entry + 8).unwrap_or(0) as usize
        };
        if let Some(raw) = tiff.get(start..start.saturating_add(len)) {
            let raw = raw.strip_suffix(&[0]).unwrap_or(raw);
            values.push(String::from_utf8_lossy(raw).into_owned());
        }
    }
    values
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(kind: &[u8; 4], data: &[u8]) -> Vec<u8> {
        let mut out = (data.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        out.extend_from_slice(&[0; 4]);
        out
    }

    #[test]
    fn prefers_the_prompt_and_falls_back_to_the_workflow() {
        let mut png = PNG_SIGNATURE.to_vec();
        png.extend(chunk(b"tEXt", b"workflow\0{\"nodes\": []}"));
        assert_eq!(
            embedded_workflow(&png).unwrap()["nodes"],
            Json::Array(vec![])
        );
        png.extend(chunk(b"comf", b"prompt\0{\"1\": {}}"));
        png.extend(chunk(b"IEND", b""));
        assert!(embedded_workflow(&png).unwrap().get("1").is_some());
    }

    #[test]
    fn reads_big_endian_exif_with_the_exif_prefix() {
        let text = b"prompt:{\"2\": {}}\0";
        let mut tiff = b"MM\x00\x2a\x00\x00\x00\x08\x00\x01\x01\x10\x00\x02".to_vec();
        tiff.extend_from_slice(&(text.len() as u32).to_be_bytes());
        tiff.extend_from_slice(&26u32.to_be_bytes());
        tiff.extend_from_slice(&[0; 4]);
        tiff.extend_from_slice(text);
        let mut exif = b"Exif\0\0".to_vec();
        exif.extend(tiff);
        let mut webp = b"RIFF\0\0\0\0WEBP".to_vec();
        webp.extend_from_slice(b"EXIF");
        webp.extend_from_slice(&(exif.len() as u32).to_le_bytes());
        webp.extend(exif);
        assert!(embedded_workflow(&webp).unwrap().get("2").is_some());
    }

    #[test]
    fn says_what_is_missing() {
        let png = [PNG_SIGNATURE, &chunk(b"IEND", b"")[..]].concat();
        let err = embedded_workflow(&png).unwrap_err().to_string();
        assert!(
            err.starts_with("png: no embedded prompt or workflow"),
            "{err}"
        );
        let err = embedded_workflow(b"GIF89a").unwrap_err().to_string();
        assert!(err.contains("not a PNG or WebP"), "{err}");
    }
}
