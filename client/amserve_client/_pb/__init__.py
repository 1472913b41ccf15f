"""Generated from proto/ by service.api.protos; not edited by hand."""
