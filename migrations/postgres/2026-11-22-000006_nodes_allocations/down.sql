DROP TABLE allocations;
DROP TABLE servers;
DROP TABLE allocation_pools;
DROP TABLE nodes;
