DROP TABLE node_certificates;
DROP TABLE node_enrollment_tokens;
DROP TABLE panel_keys;
