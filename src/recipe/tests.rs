//! Unit tests of `recipe.rs`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
use super::*;

const R: &str = "# about: a test recipe\n\
# var container_image_base = debian:trixie ; the base\n\
# var pytorch_version = 2.0.0 ; torch\n\
Bootstrap: docker\nFrom: {{ container_image_base }}\n\n%post\n    pip install torch=={{pytorch_version}} # {{ pytorch_version }}\n\
%labels\n    pytorch {{pytorch_version}}\n    recipe {{ recipe }}\n";

fn sets(v: &[(&str, &str)]) -> Vec<(String, String)> {
    v.iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn parses_declarations() {
    let r = Recipe::parse("t", R).unwrap();
    assert_eq!(r.about, "a test recipe");
    assert_eq!(r.variables.len(), 2);
    assert_eq!(r.variables[0].name, "container_image_base");
    assert_eq!(r.variables[0].default, "debian:trixie");
    assert_eq!(r.variables[0].doc, "the base");
}

#[test]
fn renders_defaults_and_sets() {
    let r = Recipe::parse("t", R).unwrap();
    let v = r.values(&sets(&[("pytorch_version", "2.1.0")])).unwrap();
    let out = r.render(&v, &[("recipe", "t".into())]).unwrap();
    assert!(out.contains("From: debian:trixie\n"), "{out}");
    assert!(out.contains("torch==2.1.0 # 2.1.0\n"), "{out}");
    let d = parse_definition(&out).unwrap();
    assert_eq!(d.labels["pytorch"], "2.1.0");
    assert_eq!(d.labels["recipe"], "t");
    assert_eq!(d.sections, ["post", "labels"]);
    assert_eq!(d.header[1], ("From".into(), "debian:trixie".into()));
}

#[test]
fn unknown_set_key_names_the_known_ones() {
    let r = Recipe::parse("t", R).unwrap();
    let e = r.values(&sets(&[("pytorch_verison", "x")])).unwrap_err();
    let m = e.to_string();
    assert!(
        m.contains("'pytorch_verison'") && m.contains("pytorch_version"),
        "{m}"
    );
}

#[test]
fn undeclared_reference_is_an_error_with_its_line() {
    let e = Recipe::parse("t", "# var a = 1\nBootstrap: x\nFrom: {{ b }}\n").unwrap_err();
    assert!(
        matches!(&e, RecipeError::UndeclaredVariable { line: 3, name, .. } if name == "b"),
        "{e}"
    );
    let e = Recipe::parse("t", "Bootstrap: x\nFrom: {{ b\n").unwrap_err();
    assert!(matches!(e, RecipeError::Unclosed { line: 2, .. }), "{e}");
}

#[test]
fn values_cannot_change_the_structure() {
    let r = Recipe::parse("t", R).unwrap();
    assert!(r.values(&sets(&[("pytorch_version", "1\n%post")])).is_err());
    assert!(r.values(&sets(&[("pytorch_version", "{{x}}")])).is_err());
}

#[test]
fn set_parsing() {
    assert_eq!(
        parse_set("a=b=c").unwrap(),
        ("a".to_string(), "b=c".to_string())
    );
    assert_eq!(parse_set("a=").unwrap(), ("a".to_string(), String::new()));
    assert!(parse_set("novalue").is_err());
    assert!(parse_set("=x").is_err());
}

#[test]
fn bad_declarations() {
    assert!(Recipe::parse("t", "# var Bad = 1\n").is_err());
    assert!(Recipe::parse("t", "# var novalue\n").is_err());
    assert!(Recipe::parse("t", "# var recipe = 1\n").is_err());
    assert!(matches!(
        Recipe::parse("t", "# var a = 1\n# var a = 2\n"),
        Err(RecipeError::DuplicateVariable { .. })
    ));
}

#[test]
fn definition_checks() {
    assert!(parse_definition("From: x\n").is_err());
    assert!(parse_definition("Bootstrap: x\n%pots\n").is_err());
    assert!(parse_definition("Bootstrap: x\n%post\n echo {{ a }}\n").is_err());
    assert!(parse_definition("Bootstrap: localimage\nFrom: /x\n%test\n true\n").is_ok());
}

/// The shipped recipes parse and render with their defaults into
/// definitions with the sections the product promises.
#[test]
fn shipped_recipes_render() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/recipes");
    let all = list(&dir);
    let names: Vec<&str> = all.iter().map(|(n, _)| n.as_str()).collect();
    assert!(
        names.contains(&"pytorch-debian") && names.contains(&"pytorch-cuda"),
        "{names:?}"
    );
    for (name, _) in &all {
        let r = load(&dir, name).unwrap();
        assert!(!r.about.is_empty(), "{name}: no '# about:' line");
        let v = r.values(&[]).unwrap();
        let out = r
            .render(
                &v,
                &[
                    ("recipe", name.clone()),
                    ("build_date", "now".into()),
                    ("image", "x:y".into()),
                ],
            )
            .unwrap();
        let d = parse_definition(&out).unwrap_or_else(|e| panic!("{name}: {e}\n{out}"));
        for s in ["environment", "labels", "test"] {
            assert!(d.sections.iter().any(|x| x == s), "{name}: no %{s}");
        }
        assert_eq!(d.labels.get("recipe"), Some(name), "{name}");
        assert!(d.labels.contains_key("pytorch"), "{name}");
    }
}

/// Seed 000's "custom configuration" example renders into the
/// pytorch-cuda definition it asks for.
#[test]
fn pytorch_cuda_custom_configuration() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("packaging/recipes");
    let r = load(&dir, "pytorch-cuda").unwrap();
    let v = r
        .values(&sets(&[
            ("pytorch_version", "2.1.0"),
            ("pytorch_cuda_version", "cu121"),
            ("mpi_type", "openmpi"),
            ("container_build_parallel", "true"),
        ]))
        .unwrap();
    let out = r
        .render(
            &v,
            &[
                ("recipe", "pytorch-cuda".into()),
                ("build_date", "d".into()),
                ("image", "pytorch:2.1".into()),
            ],
        )
        .unwrap();
    let d = parse_definition(&out).unwrap();
    assert_eq!(d.header[0], ("Bootstrap".into(), "docker".into()));
    assert_eq!(d.header[1].1, "nvidia/cuda:12.1.1-devel-ubuntu22.04");
    assert_eq!(d.labels["pytorch"], "2.1.0");
    assert_eq!(d.labels["cuda"], "cu121");
    assert_eq!(d.labels["mpi"], "openmpi 4.1.4");
    assert!(out.contains("\"torch==2.1.0\""), "{out}");
    assert!(
        out.contains("if [ \"true\" = true ]; then jobs=$(nproc)"),
        "{out}"
    );
    assert!(out.contains("case \"openmpi\" in"), "{out}");
    for s in ["post", "environment", "labels", "runscript", "test"] {
        assert!(d.sections.iter().any(|x| x == s), "no %{s}");
    }
    // The seed's defaults: PyTorch 2.0.0 for cu121.
    let out = r
        .render(
            &r.values(&[]).unwrap(),
            &[
                ("recipe", "x".into()),
                ("build_date", "d".into()),
                ("image", "x:y".into()),
            ],
        )
        .unwrap();
    assert_eq!(parse_definition(&out).unwrap().labels["pytorch"], "2.0.0");
}
