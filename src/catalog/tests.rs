//! Unit tests of `catalog.rs`.

use super::*;

fn parse(text: &str) -> Result<Catalog, CatalogError> {
    Catalog::parse(Path::new("/opt/containers/.registry/catalog.toml"), text)
}

const GOOD: &str = r#"version = 1

[[image]]
name = "pytorch"
tag = "2.1"
path = "ml-frameworks/pytorch-2.1.sif"
sha256 = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
size = 1114112
aliases = ["nvcr.io/nvidia/pytorch:24.01-py3"]
description = "PyTorch 2.1"
labels = { cuda = "12.1", pytorch = "2.1" }
added = 2024-01-15T10:00:00Z

[[image]]
name = "pytorch"
tag = "2.2"
path = "/opt/containers/ml-frameworks/pytorch-2.2.sif"
added = "2024-03-01T00:00:00+01:00"

[[image]]
name = "tensorflow"
tag = "2.15"
path = "ml-frameworks/tf.sif"
default = true
"#;

#[test]
fn good_catalog() {
    let c = parse(GOOD).unwrap();
    assert_eq!(c.images.len(), 3);
    assert_eq!(c.images[0].line, 3);
    assert_eq!(
        c.images[0].labels.get("cuda").map(String::as_str),
        Some("12.1")
    );
    assert_eq!(c.get("pytorch", "2.1").map(|i| i.size), Some(Some(1114112)));
    // No default for pytorch: the newest added wins.
    assert_eq!(
        c.default_for("pytorch").map(|i| i.tag.as_str()),
        Some("2.2")
    );
    assert_eq!(
        c.default_for("tensorflow").map(|i| i.tag.as_str()),
        Some("2.15")
    );
    assert_eq!(
        c.by_alias("nvcr.io/nvidia/pytorch:24.01-py3")
            .map(Image::reference),
        Some("pytorch:2.1".to_string())
    );
    assert!(c.references().any(|r| r == "tensorflow:2.15"));
}

#[test]
fn default_beats_newest() {
    let c = parse(
        "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a1.sif\"\ndefault = true\n\
         added = 2020-01-01T00:00:00Z\n[[image]]\nname = \"a\"\ntag = \"2\"\npath = \"a2.sif\"\n\
         added = 2024-01-01T00:00:00Z\n",
    )
    .unwrap();
    assert_eq!(c.default_for("a").map(|i| i.tag.as_str()), Some("1"));
}

fn err(text: &str) -> CatalogError {
    parse(text).unwrap_err()
}

#[test]
fn errors_name_line_and_entry() {
    let e = err(
        "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\ncolour = \"red\"\n",
    );
    assert_eq!(e.line, 6);
    assert_eq!(e.entry, "#1");
    assert!(e.message.contains("colour"), "{e}");

    let dup = "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\n\
               [[image]]\nname = \"a\"\ntag = \"1\"\npath = \"b.sif\"\n";
    let e = err(dup);
    assert_eq!((e.line, e.entry.as_str()), (6, "#2 a:1"));
    assert!(
        e.message.contains("duplicate a:1") && e.message.contains("line 2"),
        "{e}"
    );

    let two_defaults =
        "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\ndefault = true\n\
                        [[image]]\nname = \"a\"\ntag = \"2\"\npath = \"b.sif\"\ndefault = true\n";
    let e = err(two_defaults);
    assert_eq!(e.line, 7);
    assert!(e.message.contains("second default"), "{e}");

    let e = err(
        "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\nsha256 = \"XYZ\"\n",
    );
    assert_eq!(e.line, 6);
    assert!(e.message.contains("sha256"), "{e}");
    let one_line = e.to_string();
    assert!(!one_line.contains('\n'));
    assert!(
        one_line.starts_with("/opt/containers/.registry/catalog.toml:6: image #1:"),
        "{one_line}"
    );
}

#[test]
fn tags_take_torch_versions() {
    for ok in ["2.6.0+debian", "2.1.0+cu121", "24.01-py3", "latest", "a_b"] {
        assert!(valid_tag(ok), "{ok}");
    }
    for bad in [
        "",
        "+cu121",
        ".x",
        "-x",
        "a b",
        "a/b",
        "a:b",
        &"1".repeat(129),
    ] {
        assert!(!valid_tag(bad), "{bad}");
    }
}

#[test]
fn file_level_errors() {
    assert!(err("").message.contains("version"));
    let e = err("version = 2\n");
    assert_eq!(e.line, 1);
    assert!(e.message.contains("version 2"));
    assert!(err("version = 1\nimage = 3\n").line == 2);
}

#[test]
fn field_validation() {
    let entry = |extra: &str| {
        format!("version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\n{extra}\n")
    };
    for bad in [
        "aliases = [\"has space\"]",
        "aliases = [\"../../etc\"]",
        "added = \"yesterday\"",
        "added = \"2024-02-30T00:00:00Z\"",
        "added = 2024-01-01",
        "size = -1",
    ] {
        assert!(parse(&entry(bad)).is_err(), "{bad} accepted");
    }
    for bad_name in ["", "UPPER", "-x", "a/../b", "a//b", "a b"] {
        let t = format!(
            "version = 1\n[[image]]\nname = \"{bad_name}\"\ntag = \"1\"\npath = \"a.sif\"\n"
        );
        assert!(parse(&t).is_err(), "name {bad_name:?} accepted");
    }
    for bad_tag in ["", "-1", ".x", "a:b", "a/b"] {
        let t = format!(
            "version = 1\n[[image]]\nname = \"a\"\ntag = \"{bad_tag}\"\npath = \"a.sif\"\n"
        );
        assert!(parse(&t).is_err(), "tag {bad_tag:?} accepted");
    }
    assert!(parse(&entry("path = \"\"")).is_err());
}

#[test]
fn alias_collisions() {
    let t = "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\naliases = [\"b:2\"]\n\
             [[image]]\nname = \"b\"\ntag = \"2\"\npath = \"b.sif\"\n";
    assert!(err(t).message.contains("alias 'b:2'"));
    let t =
        "version = 1\n[[image]]\nname = \"a\"\ntag = \"1\"\npath = \"a.sif\"\naliases = [\"x\"]\n\
             [[image]]\nname = \"b\"\ntag = \"2\"\npath = \"b.sif\"\naliases = [\"x\"]\n";
    assert!(err(t).message.contains("also an alias"));
}

#[test]
fn registry_settings() {
    let p = Path::new("/r/.registry/config.toml");
    let s = RegistrySettings::parse(
        p,
        "version = 1\nsearch_dirs = [\"images\"]\nverify = \"full\"\n",
    )
    .unwrap();
    assert_eq!(s.search_dirs, Some(vec![SearchDir("images".into())]));
    assert_eq!(s.verify, Some(crate::config::VerifyLevel::Full));
    assert_eq!(
        RegistrySettings::parse(p, "").unwrap(),
        RegistrySettings {
            version: 1,
            ..Default::default()
        }
    );
    for bad in [
        "version = 2",
        "search_dirs = [\"../x\"]",
        "search_dirs = [\"a/b\"]",
        "colour = 1",
        "verify = \"never\"",
    ] {
        assert!(RegistrySettings::parse(p, bad).is_err(), "{bad} accepted");
    }
    let e = RegistrySettings::parse(p, "version = 1\n\nverify = 3\n").unwrap_err();
    assert_eq!(e.line, 3);
}

#[test]
fn rfc3339() {
    assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
    assert_eq!(parse_rfc3339("1970-01-01T01:00:00+01:00"), Some(0));
    assert_eq!(parse_rfc3339("2000-03-01T00:00:00.123Z"), Some(951_868_800));
    assert_eq!(
        parse_rfc3339("2024-02-29T00:00:00Z").map(|s| s > 0),
        Some(true)
    );
    for bad in [
        "2023-02-29T00:00:00Z",
        "2024-13-01T00:00:00Z",
        "2024-01-01T00:00:00",
        "2024-01-01T24:00:00Z",
        "x",
    ] {
        assert_eq!(parse_rfc3339(bad), None, "{bad}");
    }
}

#[test]
fn hostile_inputs_do_not_panic() {
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let bytes = GOOD.as_bytes();
    for _ in 0..2000 {
        let mut t = bytes.to_vec();
        for _ in 0..4 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let pos = (seed as usize) % t.len();
            t[pos] = (seed >> 32) as u8;
        }
        let _ = parse(&String::from_utf8_lossy(&t));
    }
    for cut in 0..GOOD.len() {
        if GOOD.is_char_boundary(cut) {
            let _ = parse(&GOOD[..cut]);
        }
    }
}
