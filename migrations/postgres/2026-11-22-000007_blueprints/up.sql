-- Blueprints imported by operators (eggs converted, or native documents). Blueprints that
-- ship as files under the blueprints folder are not stored here; a slug names one or the
-- other, never both.
CREATE TABLE blueprints (
    slug TEXT PRIMARY KEY NOT NULL,
    name TEXT NOT NULL,
    -- The blueprint document as JSON (the wire format wings receives).
    document TEXT NOT NULL,
    -- PTDL_v1, PTDL_v2, PLCN_v1..3 for converted eggs, or native.
    source_format TEXT NOT NULL,
    -- The import report as JSON: every egg field that did not map one to one.
    report TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
