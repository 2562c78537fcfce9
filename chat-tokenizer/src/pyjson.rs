//! Python's `json.dumps` over MiniJinja values: what Hugging Face's `tojson` filter produces.
//!
//! transformers replaces Jinja's HTML-safe `tojson` with
//! `json.dumps(x, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)`,
//! so a template's tool schemas, arguments and documents come out exactly as Python writes them:
//! `", "` and `": "` between items unless indenting, non-ASCII text unescaped, floats as Python's
//! `repr`, keys in insertion order.

use std::fmt::Write;

use minijinja::value::{Kwargs, ValueKind};
use minijinja::{Error, ErrorKind, Value};

/// How to write the JSON, as `json.dumps`' keyword arguments.
pub(crate) struct Options {
    ensure_ascii: bool,
    indent: Option<String>,
    item_sep: String,
    key_sep: String,
    sort_keys: bool,
}

impl Options {
    /// `tojson`'s keyword arguments (`ensure_ascii`, `indent`, `separators`, `sort_keys`) with
    /// Hugging Face's defaults.
    pub(crate) fn from_kwargs(kwargs: &Kwargs) -> Result<Options, Error> {
        let ensure_ascii = kwargs.get::<Option<bool>>("ensure_ascii")?.unwrap_or(false);
        let sort_keys = kwargs.get::<Option<bool>>("sort_keys")?.unwrap_or(false);
        let indent = match kwargs.get::<Option<Value>>("indent")? {
            None => None,
            Some(v) if v.is_none() => None,
            Some(v) => Some(if let Some(s) = v.as_str() {
                s.to_owned()
            } else {
                let n = v.as_i64().ok_or_else(|| {
                    Error::new(
                        ErrorKind::InvalidOperation,
                        "tojson: indent must be an int or a string",
                    )
                })?;
                " ".repeat(usize::try_from(n).unwrap_or(0))
            }),
        };
        let (mut item_sep, mut key_sep) = if indent.is_some() {
            (",".to_owned(), ": ".to_owned())
        } else {
            (", ".to_owned(), ": ".to_owned())
        };
        if let Some(seps) = kwargs.get::<Option<Value>>("separators")? {
            if !seps.is_none() {
                let item = seps.get_item_by_index(0)?;
                let key = seps.get_item_by_index(1)?;
                match (item.as_str(), key.as_str()) {
                    (Some(i), Some(k)) => {
                        item_sep = i.to_owned();
                        key_sep = k.to_owned();
                    }
                    _ => {
                        return Err(Error::new(
                            ErrorKind::InvalidOperation,
                            "tojson: separators must be two strings",
                        ))
                    }
                }
            }
        }
        kwargs.assert_all_used()?;
        Ok(Options {
            ensure_ascii,
            indent,
            item_sep,
            key_sep,
            sort_keys,
        })
    }
}

/// `json.dumps(value, **options)`.
pub(crate) fn dumps(value: &Value, options: &Options) -> Result<String, Error> {
    let mut out = String::new();
    write_value(&mut out, value, options, 0)?;
    Ok(out)
}

fn not_serializable(value: &Value) -> Error {
    Error::new(
        ErrorKind::InvalidOperation,
        format!(
            "tojson: object of kind {} is not JSON serializable",
            value.kind()
        ),
    )
}

fn newline(out: &mut String, options: &Options, level: usize) {
    if let Some(indent) = &options.indent {
        out.push('\n');
        for _ in 0..level {
            out.push_str(indent);
        }
    }
}

fn write_value(
    out: &mut String,
    value: &Value,
    options: &Options,
    level: usize,
) -> Result<(), Error> {
    let kind = value.kind();
    if kind == ValueKind::None {
        out.push_str("null");
    } else if kind == ValueKind::Bool {
        out.push_str(if value.is_true() { "true" } else { "false" });
    } else if kind == ValueKind::Number {
        write_number(out, value);
    } else if kind == ValueKind::String {
        write_string(
            out,
            value.as_str().unwrap_or_default(),
            options.ensure_ascii,
        );
    } else if kind == ValueKind::Seq || kind == ValueKind::Iterable {
        let items: Vec<Value> = value.try_iter()?.collect();
        if items.is_empty() {
            out.push_str("[]");
            return Ok(());
        }
        out.push('[');
        for (i, item) in items.iter().enumerate() {
            if i > 0 {
                out.push_str(&options.item_sep);
            }
            newline(out, options, level + 1);
            write_value(out, item, options, level + 1)?;
        }
        newline(out, options, level);
        out.push(']');
    } else if kind == ValueKind::Map {
        let mut keys: Vec<Value> = value.try_iter()?.collect();
        if keys.is_empty() {
            out.push_str("{}");
            return Ok(());
        }
        if options.sort_keys {
            keys.sort();
        }
        out.push('{');
        for (i, key) in keys.iter().enumerate() {
            if i > 0 {
                out.push_str(&options.item_sep);
            }
            newline(out, options, level + 1);
            write_string(out, &key_string(key)?, options.ensure_ascii);
            out.push_str(&options.key_sep);
            write_value(out, &value.get_item(key)?, options, level + 1)?;
        }
        newline(out, options, level);
        out.push('}');
    } else {
        return Err(not_serializable(value));
    }
    Ok(())
}

/// A dict key as `json.dumps` turns it into a string.
fn key_string(key: &Value) -> Result<String, Error> {
    let kind = key.kind();
    if kind == ValueKind::String {
        Ok(key.as_str().unwrap_or_default().to_owned())
    } else if kind == ValueKind::None {
        Ok("null".to_owned())
    } else if kind == ValueKind::Bool {
        Ok(if key.is_true() { "true" } else { "false" }.to_owned())
    } else if kind == ValueKind::Number {
        let mut s = String::new();
        write_number(&mut s, key);
        Ok(s)
    } else {
        Err(Error::new(
            ErrorKind::InvalidOperation,
            format!("tojson: keys must be str, int, float, bool or None, not {kind}"),
        ))
    }
}

fn write_number(out: &mut String, value: &Value) {
    if value.is_integer() {
        // Integers of any width print as their digits.
        let _ = write!(out, "{value}");
    } else {
        out.push_str(&python_float(
            f64::try_from(value.clone()).unwrap_or(f64::NAN),
        ));
    }
}

/// `float.__repr__`: the shortest round-trip digits, in positional notation for exponents in
/// [-4, 16) and scientific (`1e+16`, `1.5e-05`) otherwise; `json.dumps` spells the non-finite
/// ones `NaN`, `Infinity`, `-Infinity`.
pub(crate) fn python_float(f: f64) -> String {
    if f.is_nan() {
        return "NaN".to_owned();
    }
    if f.is_infinite() {
        return if f > 0.0 { "Infinity" } else { "-Infinity" }.to_owned();
    }
    // `{:e}` gives the shortest round-trip digits: "-1.2345e-7", "1e20".
    let sci = format!("{f:e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let (sign, mantissa) = match mantissa.strip_prefix('-') {
        Some(m) => ("-", m),
        None => ("", mantissa),
    };
    let digits: String = mantissa.chars().filter(|c| *c != '.').collect();
    if (-4..16).contains(&exp) {
        let n = digits.len() as i32;
        if exp < 0 {
            let zeros = "0".repeat((-exp - 1) as usize);
            format!("{sign}0.{zeros}{digits}")
        } else if exp + 1 >= n {
            let zeros = "0".repeat((exp + 1 - n) as usize);
            format!("{sign}{digits}{zeros}.0")
        } else {
            let (int, frac) = digits.split_at((exp + 1) as usize);
            format!("{sign}{int}.{frac}")
        }
    } else {
        let (first, rest) = digits.split_at(1);
        let mantissa = if rest.is_empty() {
            first.to_owned()
        } else {
            format!("{first}.{rest}")
        };
        let exp_sign = if exp < 0 { '-' } else { '+' };
        format!("{sign}{mantissa}e{exp_sign}{:02}", exp.abs())
    }
}

/// A JSON string literal as Python writes it.
fn write_string(out: &mut String, s: &str, ensure_ascii: bool) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c if ensure_ascii && !c.is_ascii() => {
                let mut units = [0u16; 2];
                for unit in c.encode_utf16(&mut units) {
                    let _ = write!(out, "\\u{unit:04x}");
                }
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floats_print_like_python_repr() {
        for (f, want) in [
            (1.0, "1.0"),
            (0.1, "0.1"),
            (-2.5, "-2.5"),
            (123.456, "123.456"),
            (1e16, "1e+16"),
            (1.5e16, "1.5e+16"),
            (1e15, "1000000000000000.0"),
            (0.0001, "0.0001"),
            (0.00001, "1e-05"),
            (-1.25e-7, "-1.25e-07"),
            (0.0, "0.0"),
            (f64::INFINITY, "Infinity"),
        ] {
            assert_eq!(python_float(f), want, "{f}");
        }
    }

    #[test]
    fn strings_escape_like_python() {
        let mut s = String::new();
        write_string(&mut s, "a\"b\\c\n\u{1}é😀\u{7f}", false);
        assert_eq!(s, "\"a\\\"b\\\\c\\n\\u0001é😀\u{7f}\"");
        let mut s = String::new();
        write_string(&mut s, "é😀", true);
        assert_eq!(s, "\"\\u00e9\\ud83d\\ude00\"");
    }
}
