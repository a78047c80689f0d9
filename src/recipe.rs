//! Image recipes (`ml-container build`, `ml-container recipes`): Apptainer
//! definition templates with named variables (`container_image_base`,
//! `pytorch_version`, `mpi_type`, ...).
//!
//! A recipe is a `.def` file whose leading comment block declares its
//! variables with their defaults:
//!
//! ```text
//! # about: Debian's PyTorch (CPU) and Open MPI
//! # var pytorch_version = 2.6.0 ; the PyTorch version label
//! Bootstrap: localimage
//! From: {{ container_image_base }}
//! ```
//!
//! Rendering replaces `{{name}}` (spaces inside the braces allowed) with
//! the value from `--set`, else the default. No expressions, no filters: a
//! definition file only needs values, and a strict replacement (an unknown
//! `--set` key, a `{{name}}` the recipe never declared, an unclosed `{{`
//! are all errors) catches typos that a template engine would render as an
//! empty string. Apptainer keeps the comment block in the image's
//! definition, which records how it was built.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// Where the package installs the recipes.
pub const RECIPE_DIR: &str = "/usr/share/slurm-ml-container/recipes";

/// Variables the CLI supplies itself; a recipe may use them but not declare
/// or `--set` them.
pub const BUILTINS: [&str; 3] = ["recipe", "build_date", "image"];

/// One declared variable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variable {
    pub name: String,
    pub default: String,
    pub doc: String,
}

/// A parsed recipe.
#[derive(Debug, Clone)]
pub struct Recipe {
    pub name: String,
    pub about: String,
    pub variables: Vec<Variable>,
    template: String,
}

#[derive(Debug)]
pub enum RecipeError {
    /// No recipe of that name in the directory.
    NotFound {
        name: String,
        dir: PathBuf,
        known: Vec<String>,
    },
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// A `# var` line that does not read `# var NAME = DEFAULT ; doc`.
    BadDeclaration {
        recipe: String,
        line: usize,
        text: String,
    },
    DuplicateVariable {
        recipe: String,
        name: String,
    },
    /// `{{name}}` in the template with no declaration.
    UndeclaredVariable {
        recipe: String,
        line: usize,
        name: String,
    },
    /// A `{{` with no `}}` on its line.
    Unclosed {
        recipe: String,
        line: usize,
    },
    /// `--set KEY=VALUE` for a key the recipe does not declare.
    UnknownSet {
        recipe: String,
        key: String,
        known: Vec<String>,
    },
    /// `--set` without `=`, or with an empty key.
    BadSet {
        arg: String,
    },
    /// A value with a newline or `{{`: it would change the definition's
    /// structure, not fill in a value.
    BadValue {
        key: String,
        value: String,
    },
}

impl fmt::Display for RecipeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RecipeError::NotFound { name, dir, known } => write!(
                f,
                "no recipe '{name}' in {}: known recipes are {}; run 'ml-container recipes'",
                dir.display(),
                if known.is_empty() {
                    "none (is the package installed?)".to_string()
                } else {
                    known.join(", ")
                }
            ),
            RecipeError::Io { path, error } => {
                write!(f, "cannot read {}: {error}", path.display())
            }
            RecipeError::BadDeclaration { recipe, line, text } => write!(
                f,
                "recipe {recipe}, line {line}: '{text}' is not a declaration: \
                 write '# var NAME = DEFAULT ; what it is'"
            ),
            RecipeError::DuplicateVariable { recipe, name } => write!(
                f,
                "recipe {recipe} declares '{name}' twice: keep one declaration"
            ),
            RecipeError::UndeclaredVariable { recipe, line, name } => write!(
                f,
                "recipe {recipe}, line {line}: '{{{{{name}}}}}' is not a declared variable: \
                 add '# var {name} = DEFAULT' to the recipe's header or fix the name"
            ),
            RecipeError::Unclosed { recipe, line } => write!(
                f,
                "recipe {recipe}, line {line}: '{{{{' without '}}}}': close the variable"
            ),
            RecipeError::UnknownSet { recipe, key, known } => write!(
                f,
                "recipe {recipe} has no variable '{key}': its variables are {}",
                known.join(", ")
            ),
            RecipeError::BadSet { arg } => {
                write!(f, "--set '{arg}': write --set KEY=VALUE")
            }
            RecipeError::BadValue { key, value } => write!(
                f,
                "--set {key}={value:?}: values may not hold a newline or '{{{{': give a plain value"
            ),
        }
    }
}

impl std::error::Error for RecipeError {}

/// `KEY=VALUE` from `--set`.
pub fn parse_set(arg: &str) -> Result<(String, String), RecipeError> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_string(), v.to_string())),
        _ => Err(RecipeError::BadSet {
            arg: arg.to_string(),
        }),
    }
}

/// The `{{name}}` references of one line: (byte start, byte end, name), or
/// the error of an unclosed `{{`.
fn references(line: &str) -> Result<Vec<(usize, usize, &str)>, ()> {
    let mut out = Vec::new();
    let mut at = 0;
    while let Some(open) = line[at..].find("{{") {
        let start = at + open;
        let Some(close) = line[start + 2..].find("}}") else {
            return Err(());
        };
        let end = start + 2 + close + 2;
        out.push((start, end, line[start + 2..end - 2].trim()));
        at = end;
    }
    Ok(out)
}

impl Recipe {
    /// Parses `text`, the recipe called `name`.
    pub fn parse(name: &str, text: &str) -> Result<Recipe, RecipeError> {
        let mut about = String::new();
        let mut variables: Vec<Variable> = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let Some(rest) = line.strip_prefix('#') else {
                continue;
            };
            let rest = rest.trim();
            if let Some(a) = rest.strip_prefix("about:") {
                about = a.trim().to_string();
            } else if let Some(decl) = rest.strip_prefix("var ") {
                let (assign, doc) = decl.split_once(" ; ").unwrap_or((decl, ""));
                let Some((k, v)) = assign.split_once('=') else {
                    return Err(RecipeError::BadDeclaration {
                        recipe: name.to_string(),
                        line: i + 1,
                        text: line.to_string(),
                    });
                };
                let k = k.trim();
                if k.is_empty()
                    || !k
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
                    || BUILTINS.contains(&k)
                {
                    return Err(RecipeError::BadDeclaration {
                        recipe: name.to_string(),
                        line: i + 1,
                        text: line.to_string(),
                    });
                }
                if variables.iter().any(|x| x.name == k) {
                    return Err(RecipeError::DuplicateVariable {
                        recipe: name.to_string(),
                        name: k.to_string(),
                    });
                }
                variables.push(Variable {
                    name: k.to_string(),
                    default: v.trim().to_string(),
                    doc: doc.trim().to_string(),
                });
            }
        }
        let recipe = Recipe {
            name: name.to_string(),
            about,
            variables,
            template: text.to_string(),
        };
        // Every reference must be declared: found now, not at build time.
        for (i, line) in text.lines().enumerate() {
            let refs = references(line).map_err(|()| RecipeError::Unclosed {
                recipe: name.to_string(),
                line: i + 1,
            })?;
            for (_, _, r) in refs {
                if !recipe.declares(r) && !BUILTINS.contains(&r) {
                    return Err(RecipeError::UndeclaredVariable {
                        recipe: name.to_string(),
                        line: i + 1,
                        name: r.to_string(),
                    });
                }
            }
        }
        Ok(recipe)
    }

    fn declares(&self, name: &str) -> bool {
        self.variables.iter().any(|v| v.name == name)
    }

    /// The value of every declared variable: defaults overridden by `sets`.
    pub fn values(
        &self,
        sets: &[(String, String)],
    ) -> Result<BTreeMap<String, String>, RecipeError> {
        let mut values: BTreeMap<String, String> = self
            .variables
            .iter()
            .map(|v| (v.name.clone(), v.default.clone()))
            .collect();
        for (k, v) in sets {
            if !self.declares(k) {
                return Err(RecipeError::UnknownSet {
                    recipe: self.name.clone(),
                    key: k.clone(),
                    known: self.variables.iter().map(|v| v.name.clone()).collect(),
                });
            }
            if v.contains('\n') || v.contains("{{") {
                return Err(RecipeError::BadValue {
                    key: k.clone(),
                    value: v.clone(),
                });
            }
            values.insert(k.clone(), v.clone());
        }
        Ok(values)
    }

    /// The definition file: every `{{name}}` replaced, from `values` (see
    /// [`Recipe::values`]) and `builtins`.
    pub fn render(
        &self,
        values: &BTreeMap<String, String>,
        builtins: &[(&str, String)],
    ) -> Result<String, RecipeError> {
        let mut out = String::with_capacity(self.template.len());
        for (i, line) in self.template.lines().enumerate() {
            let refs = references(line).map_err(|()| RecipeError::Unclosed {
                recipe: self.name.clone(),
                line: i + 1,
            })?;
            let mut at = 0;
            for (start, end, name) in refs {
                let value = values.get(name).cloned().or_else(|| {
                    builtins
                        .iter()
                        .find(|(k, _)| *k == name)
                        .map(|(_, v)| v.clone())
                });
                let Some(value) = value else {
                    return Err(RecipeError::UndeclaredVariable {
                        recipe: self.name.clone(),
                        line: i + 1,
                        name: name.to_string(),
                    });
                };
                out.push_str(&line[at..start]);
                out.push_str(&value);
                at = end;
            }
            out.push_str(&line[at..]);
            out.push('\n');
        }
        Ok(out)
    }
}

/// The recipes in `dir`: (name, path), sorted by name.
pub fn list(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out: Vec<(String, PathBuf)> = std::fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| {
                let p = e.ok()?.path();
                let name = p.file_name()?.to_str()?.strip_suffix(".def")?.to_string();
                Some((name, p))
            })
            .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Loads the recipe `name` from `dir`, or from a path when `name` holds a `/`.
pub fn load(dir: &Path, name: &str) -> Result<Recipe, RecipeError> {
    let path = if name.contains('/') {
        PathBuf::from(name)
    } else {
        dir.join(format!("{name}.def"))
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !name.contains('/') => {
            return Err(RecipeError::NotFound {
                name: name.to_string(),
                dir: dir.to_path_buf(),
                known: list(dir).into_iter().map(|(n, _)| n).collect(),
            })
        }
        Err(error) => return Err(RecipeError::Io { path, error }),
    };
    let short = Path::new(name)
        .file_name()
        .and_then(|f| f.to_str())
        .map_or(name, |f| f.strip_suffix(".def").unwrap_or(f));
    Recipe::parse(short, &text)
}

/// What a rendered definition file holds, for checks and for the catalog.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Definition {
    /// Header keys (`Bootstrap`, `From`, ...), in order.
    pub header: Vec<(String, String)>,
    /// Section names (`post`, `environment`, ...), in order.
    pub sections: Vec<String>,
    /// `%labels` entries.
    pub labels: BTreeMap<String, String>,
}

/// The sections Apptainer 1.4 knows.
const SECTIONS: [&str; 13] = [
    "setup",
    "files",
    "post",
    "environment",
    "runscript",
    "startscript",
    "test",
    "labels",
    "help",
    "arguments",
    "pre",
    "appinstall",
    "appenv",
];

/// Parses a rendered definition: header, sections, labels. Refuses what
/// `apptainer build` would refuse or silently misread: no `Bootstrap`,
/// an unknown section, text left over from a template.
pub fn parse_definition(def: &str) -> Result<Definition, String> {
    let mut d = Definition::default();
    let mut section: Option<String> = None;
    for (i, line) in def.lines().enumerate() {
        let n = i + 1;
        if line.contains("{{") || line.contains("}}") {
            return Err(format!("line {n}: template text left: {line}"));
        }
        let t = line.trim();
        if let Some(s) = t.strip_prefix('%') {
            let s = s.split_whitespace().next().unwrap_or("");
            if !SECTIONS.contains(&s) {
                return Err(format!("line {n}: unknown section %{s}"));
            }
            section = Some(s.to_string());
            continue;
        }
        match section.as_deref() {
            None => {
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                let Some((k, v)) = t.split_once(':') else {
                    return Err(format!("line {n}: header line without 'Key: value': {t}"));
                };
                d.header.push((k.trim().to_string(), v.trim().to_string()));
            }
            Some("labels") => {
                if t.is_empty() || t.starts_with('#') {
                    continue;
                }
                let mut kv = t.splitn(2, char::is_whitespace);
                let k = kv.next().unwrap_or("");
                let v = kv.next().unwrap_or("").trim();
                d.labels.insert(k.to_string(), v.to_string());
            }
            Some(_) => {}
        }
        if let Some(s) = &section {
            if !d.sections.contains(s) {
                d.sections.push(s.clone());
            }
        }
    }
    if !d
        .header
        .first()
        .is_some_and(|(k, v)| k.eq_ignore_ascii_case("bootstrap") && !v.is_empty())
    {
        return Err("the header must start with 'Bootstrap: AGENT'".to_string());
    }
    Ok(d)
}

#[cfg(test)]
mod tests;
