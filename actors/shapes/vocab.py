"""The closed vocabulary of the shapes world: every attribute an object can have."""

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")

# RGB values far apart in colour space so a small vision tower separates them easily.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 30),
    "purple": (150, 50, 200),
    "orange": (245, 135, 20),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)

SIZES: tuple[str, ...] = ("small", "large")

# Row-major names of the 3x3 grid cells; a caption lists objects in this order.
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right",
    "left", "center", "right",
    "bottom left", "bottom", "bottom right",
)

BACKGROUND: tuple[int, int, int] = (245, 245, 240)

MAX_OBJECTS = 4
