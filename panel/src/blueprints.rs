//! The blueprint registry: the files of the blueprints folder (`blueprints.dir`), read once
//! at start, plus the blueprints operators import (eggs converted by [`crate::eggs`], or
//! native documents), kept in the `blueprints` table. A slug names a file or an imported
//! blueprint, never both: imports cannot shadow a file.

use std::collections::BTreeMap;
use std::path::Path;

use diesel::prelude::*;
use mamba_shared::blueprint::Blueprint;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::audit::{self, Actor, Event};
use crate::db::schema::blueprints;
use crate::db::{DbConnection, now_ms};
use crate::eggs::{self, ImportError, Report};
use crate::error::ApiError;
use crate::request_meta::RequestMeta;

/// The file blueprints, by slug.
#[derive(Debug, Clone, Default)]
pub struct Registry {
    files: BTreeMap<String, Blueprint>,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot read the blueprints folder {0}: {1}")]
    Io(String, std::io::Error),
    #[error(transparent)]
    Blueprint(#[from] mamba_shared::blueprint::BlueprintError),
    #[error("{file}: the file must be named after its slug ({slug}.yaml)")]
    Name { file: String, slug: String },
}

impl Registry {
    /// Reads every `*.yaml` in `dir`. A missing folder gives an empty registry (with a
    /// warning); a bad file is an error naming the file and field.
    pub fn load(dir: &Path) -> Result<Registry, RegistryError> {
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::warn!(dir = %dir.display(), "the blueprints folder does not exist; only imported blueprints are available");
                return Ok(Registry::default());
            }
            Err(e) => return Err(RegistryError::Io(dir.display().to_string(), e)),
        };
        let mut files = BTreeMap::new();
        for entry in entries {
            let path = entry
                .map_err(|e| RegistryError::Io(dir.display().to_string(), e))?
                .path();
            if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
                continue;
            }
            let file = path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let text = std::fs::read_to_string(&path).map_err(|e| RegistryError::Io(file.clone(), e))?;
            let blueprint = Blueprint::from_yaml(&file, &text)?;
            if file != format!("{}.yaml", blueprint.slug) {
                return Err(RegistryError::Name {
                    file,
                    slug: blueprint.slug,
                });
            }
            files.insert(blueprint.slug.clone(), blueprint);
        }
        Ok(Registry { files })
    }

    pub fn file(&self, slug: &str) -> Option<&Blueprint> {
        self.files.get(slug)
    }

    pub fn len(&self) -> usize {
        self.files.len()
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty()
    }
}

/// Where a blueprint comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    File,
    Imported,
}

/// One line of the blueprint list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Summary {
    pub slug: String,
    pub name: String,
    pub version: String,
    pub source: Source,
    /// `native`, or the egg format it was converted from (`PTDL_v2`, `PLCN_v3` ...).
    pub source_format: String,
}

fn summary(b: &Blueprint, source: Source, source_format: &str) -> Summary {
    Summary {
        slug: b.slug.clone(),
        name: b.name.clone(),
        version: b.version.clone(),
        source,
        source_format: source_format.into(),
    }
}

/// Every blueprint, by slug.
pub fn list(conn: &mut DbConnection, registry: &Registry) -> QueryResult<Vec<Summary>> {
    let mut all: BTreeMap<String, Summary> = registry
        .files
        .values()
        .map(|b| (b.slug.clone(), summary(b, Source::File, "native")))
        .collect();
    let stored: Vec<(String, String, String)> = blueprints::table
        .select((blueprints::slug, blueprints::document, blueprints::source_format))
        .load(conn)?;
    for (slug, document, format) in stored {
        if let Ok(b) = serde_json::from_str::<Blueprint>(&document) {
            all.entry(slug)
                .or_insert_with(|| summary(&b, Source::Imported, &format));
        }
    }
    Ok(all.into_values().collect())
}

/// A blueprint with where it came from and, for imports, the import report.
#[derive(Debug, Clone)]
pub struct Found {
    pub blueprint: Blueprint,
    pub source: Source,
    pub report: Option<Report>,
}

pub fn find(conn: &mut DbConnection, registry: &Registry, slug: &str) -> QueryResult<Option<Found>> {
    if let Some(b) = registry.file(slug) {
        return Ok(Some(Found {
            blueprint: b.clone(),
            source: Source::File,
            report: None,
        }));
    }
    let row: Option<(String, String)> = blueprints::table
        .find(slug)
        .select((blueprints::document, blueprints::report))
        .first(conn)
        .optional()?;
    Ok(row.and_then(|(document, report)| {
        Some(Found {
            blueprint: serde_json::from_str(&document).ok()?,
            source: Source::Imported,
            report: serde_json::from_str(&report).ok(),
        })
    }))
}

/// What an import produced.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ImportResult {
    /// The blueprint document (the format in `shared::blueprint`).
    #[schema(value_type = Object)]
    pub blueprint: Blueprint,
    pub report: Report,
    /// False for a dry run.
    pub stored: bool,
}

/// Options of an import.
#[derive(Debug, Clone, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
#[serde(deny_unknown_fields)]
pub struct ImportOptions {
    /// Use this slug instead of one made from the egg's name.
    pub slug: Option<String>,
    /// Convert and report, but store nothing.
    #[serde(default)]
    pub dry_run: bool,
    /// Replace an imported blueprint with the same slug.
    #[serde(default)]
    pub replace: bool,
}

/// Converts `text` (an egg in JSON or YAML, or a native blueprint in YAML) and, unless it is
/// a dry run, stores it with its audit entry.
pub fn import(
    conn: &mut DbConnection,
    registry: &Registry,
    text: &str,
    options: &ImportOptions,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<ImportResult, ApiError> {
    let (blueprint, report) = convert(text, options.slug.as_deref())?;
    if options.dry_run {
        return Ok(ImportResult {
            blueprint,
            report,
            stored: false,
        });
    }
    if registry.file(&blueprint.slug).is_some() {
        return Err(ApiError::conflict(
            "slug_taken",
            format!(
                "{} is a blueprint file; import under another slug",
                blueprint.slug
            ),
        )
        .with_field("slug"));
    }
    let document = serde_json::to_string(&blueprint).map_err(|e| ApiError::internal(e.to_string()))?;
    let report_json = serde_json::to_string(&report).map_err(|e| ApiError::internal(e.to_string()))?;
    crate::db::transaction(conn, |conn| {
        let exists: i64 = blueprints::table
            .filter(blueprints::slug.eq(&blueprint.slug))
            .count()
            .get_result(conn)?;
        let now = now_ms();
        if exists > 0 {
            if !options.replace {
                return Err(ApiError::conflict(
                    "slug_taken",
                    format!(
                        "{} is already imported; pass replace=true to replace it",
                        blueprint.slug
                    ),
                )
                .with_field("slug"));
            }
            diesel::update(blueprints::table.find(&blueprint.slug))
                .set((
                    blueprints::name.eq(&blueprint.name),
                    blueprints::document.eq(&document),
                    blueprints::source_format.eq(&report.source_format),
                    blueprints::report.eq(&report_json),
                    blueprints::updated_at.eq(now),
                ))
                .execute(conn)?;
        } else {
            diesel::insert_into(blueprints::table)
                .values((
                    blueprints::slug.eq(&blueprint.slug),
                    blueprints::name.eq(&blueprint.name),
                    blueprints::document.eq(&document),
                    blueprints::source_format.eq(&report.source_format),
                    blueprints::report.eq(&report_json),
                    blueprints::created_at.eq(now),
                    blueprints::updated_at.eq(now),
                ))
                .execute(conn)?;
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "blueprint.import",
                resource_type: "blueprint",
                resource_id: Some(blueprint.slug.clone()),
                metadata: json!({
                    "source_format": report.source_format, "replaced": exists > 0,
                    "unmapped": report.count(eggs::Outcome::Unmapped),
                    "changed": report.count(eggs::Outcome::Changed),
                }),
            },
        )?;
        Ok(())
    })?;
    Ok(ImportResult {
        blueprint,
        report,
        stored: true,
    })
}

/// A native blueprint (its `format` is ours; YAML or JSON) or else an egg.
fn convert(text: &str, slug: Option<&str>) -> Result<(Blueprint, Report), ApiError> {
    let format = serde_norway::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| v.get("format").and_then(|f| f.as_str()).map(str::to_string));
    if format.as_deref() == Some(mamba_shared::blueprint::FORMAT) {
        let mut blueprint = Blueprint::from_yaml("import", text)
            .map_err(|e| ApiError::validation(e.field_errors()).with_code("invalid_blueprint"))?;
        if let Some(slug) = slug {
            blueprint.slug = slug.to_string();
            blueprint
                .validate()
                .map_err(|e| ApiError::validation(e).with_code("invalid_blueprint"))?;
        }
        let report = Report {
            source_format: "native".into(),
            items: Vec::new(),
        };
        return Ok((blueprint, report));
    }
    match eggs::import(text, slug) {
        Ok(imported) => Ok((imported.blueprint, imported.report)),
        Err(ImportError::NotAnEgg(why)) => Err(ApiError::invalid(
            "body",
            format!("not an egg or a blueprint: {why}"),
        )
        .with_code("not_an_egg")),
        Err(ImportError::Invalid { errors, .. }) => {
            Err(ApiError::validation(errors).with_code("invalid_blueprint"))
        }
    }
}

/// Removes an imported blueprint. Files are removed from the folder, not here.
pub fn delete(
    conn: &mut DbConnection,
    registry: &Registry,
    slug: &str,
    actor: &Actor,
    meta: &RequestMeta,
) -> Result<(), ApiError> {
    if registry.file(slug).is_some() {
        return Err(ApiError::conflict(
            "blueprint_is_a_file",
            "this blueprint is a file in the blueprints folder; remove the file instead",
        ));
    }
    crate::db::transaction(conn, |conn| {
        let n = diesel::delete(blueprints::table.find(slug)).execute(conn)?;
        if n == 0 {
            return Err(ApiError::not_found("blueprint"));
        }
        audit::record(
            conn,
            actor,
            meta,
            Event {
                tenant: None,
                action: "blueprint.delete",
                resource_type: "blueprint",
                resource_id: Some(slug.to_string()),
                metadata: json!({}),
            },
        )?;
        Ok(())
    })
}
