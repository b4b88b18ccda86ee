"""The working space's scale, shared by geometry (which builds in it) and export/evaluate (which write metres)."""

# One working-space unit is 0.2 m: the template is 0.32 m from the crown to the bottom of the neck
# and 1.6 units tall. Export multiplies working-space coordinates by this to write metres. For a
# user template the true scale is unknown, so export should assume the same (a head is a head).
METRES_PER_UNIT = 0.2
