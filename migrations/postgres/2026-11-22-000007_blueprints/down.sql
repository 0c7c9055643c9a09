DROP TABLE blueprints;
