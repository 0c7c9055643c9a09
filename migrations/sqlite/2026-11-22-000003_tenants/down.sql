DROP TABLE invitations;
DROP TABLE memberships;
DROP TABLE roles;
DROP TABLE tenants;
