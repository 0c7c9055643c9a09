DROP TABLE secrets;
DROP TABLE tenant_keys;
