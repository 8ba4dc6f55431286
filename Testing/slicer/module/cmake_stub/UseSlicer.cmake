set(Slicer_QTSCRIPTEDMODULES_LIB_DIR lib/Slicer-5.12/qt-scripted-modules)
set(Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR ${Slicer_QTSCRIPTEDMODULES_LIB_DIR})
set(BUILD_TESTING ON)

macro(ctkMacroCompilePythonScript)
  cmake_parse_arguments(CTKPY "NO_INSTALL_SUBDIR"
    "TARGET_NAME;SOURCE_DIR;DESTINATION_DIR;INSTALL_DIR" "SCRIPTS;RESOURCES" ${ARGN})
  if(NOT CTKPY_SOURCE_DIR)
    set(CTKPY_SOURCE_DIR ${CMAKE_CURRENT_SOURCE_DIR})
  endif()
  foreach(f ${CTKPY_SCRIPTS})
    if(NOT EXISTS ${CTKPY_SOURCE_DIR}/${f})
      message(FATAL_ERROR "script ${CTKPY_SOURCE_DIR}/${f} does not exist")
    endif()
    get_filename_component(d ${f} DIRECTORY)
    file(COPY ${CTKPY_SOURCE_DIR}/${f} DESTINATION ${CTKPY_DESTINATION_DIR}/${d})
    file(APPEND ${CMAKE_BINARY_DIR}/installed.txt "${CTKPY_TARGET_NAME} ${d}/${f}\n")
  endforeach()
  foreach(f ${CTKPY_RESOURCES})
    get_filename_component(d ${f} DIRECTORY)
    file(COPY ${CMAKE_CURRENT_SOURCE_DIR}/${f} DESTINATION ${CTKPY_DESTINATION_DIR}/${d})
  endforeach()
endmacro()

macro(slicerMacroBuildScriptedModule)
  cmake_parse_arguments(MY_SLICER "WITH_GENERIC_TESTS;WITH_SUBDIR;VERBOSE" "NAME"
    "SCRIPTS;RESOURCES" ${ARGN})
  if(MY_SLICER_UNPARSED_ARGUMENTS)
    message(FATAL_ERROR "Unknown keywords: ${MY_SLICER_UNPARSED_ARGUMENTS}")
  endif()
  foreach(f ${MY_SLICER_SCRIPTS} ${MY_SLICER_RESOURCES})
    if(NOT EXISTS ${CMAKE_CURRENT_SOURCE_DIR}/${f})
      message(FATAL_ERROR "slicerMacroBuildScriptedModule given nonexistent file ${f}")
    endif()
  endforeach()
  ctkMacroCompilePythonScript(
    TARGET_NAME ${MY_SLICER_NAME}
    SCRIPTS "${MY_SLICER_SCRIPTS}"
    RESOURCES "${MY_SLICER_RESOURCES}"
    DESTINATION_DIR ${CMAKE_BINARY_DIR}/${Slicer_QTSCRIPTEDMODULES_LIB_DIR}
    INSTALL_DIR ${Slicer_INSTALL_QTSCRIPTEDMODULES_LIB_DIR}
    NO_INSTALL_SUBDIR)
endmacro()

macro(slicer_add_python_unittest)
  cmake_parse_arguments(PYTEST "" "SCRIPT" "SLICER_ARGS" ${ARGN})
  if(NOT EXISTS ${PYTEST_SCRIPT})
    message(FATAL_ERROR "test script ${PYTEST_SCRIPT} does not exist")
  endif()
  file(APPEND ${CMAKE_BINARY_DIR}/tests.txt "${PYTEST_SCRIPT}\n")
endmacro()
