# Stand-in for Slicer's build tree: just enough of its macros to configure the extension and
# lay its Python files out the way a real build installs them (one flat scripted-module dir).
set(Slicer_USE_FILE ${CMAKE_CURRENT_LIST_DIR}/UseSlicer.cmake)
set(Slicer_EXTENSION_GENERATE_CONFIG ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
set(Slicer_EXTENSION_CPACK ${CMAKE_CURRENT_LIST_DIR}/Nothing.cmake)
set(Slicer_FOUND TRUE)
